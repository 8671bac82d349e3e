"""`exaconnect link` / `exaconnect view` as registered by `exaconnect.cli.view.register`."""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from exaconnect.errors import LayerError
from exaconnect.cli.view import register


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="exaconnect")
    register(top.add_subparsers(dest="command", required=True))
    return top


def test_link_long_prints_the_state_in_the_link(viewer_fib25_layers, capsys: pytest.CaptureFixture) -> None:
    args = parser().parse_args(["link", str(viewer_fib25_layers.image), "--base-url", "https://ng.example/", "--long"])
    assert args.func(args) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith("https://ng.example/#!%7B")
    state = json.loads(urllib.parse.unquote(url.split("#!", 1)[1]))
    assert state["layers"][0]["source"][0]["url"] == "precomputed://http://127.0.0.1:8765/data/fib25_image"


def test_link_prints_a_short_link_to_the_saved_state(viewer_fib25_layers, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = parser().parse_args(["link", str(viewer_fib25_layers.image), "--state-dir", str(tmp_path), "--name", "v1"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "http://127.0.0.1:8765/v/exaconnect/#!http://127.0.0.1:8765/states/v1.json"
    assert str(tmp_path / "v1.json") in out.err and f"--state-dir {tmp_path}" in out.err
    state = json.loads((tmp_path / "v1.json").read_text())
    assert state["layers"][0]["source"][0]["url"] == "precomputed://http://127.0.0.1:8765/data/fib25_image"
    # Another client must be let in by `view`: the hint says how.
    args = parser().parse_args(["link", str(viewer_fib25_layers.image), "--state-dir", str(tmp_path), "--base-url",
                                "https://neuroglancer-demo.appspot.com/"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert out.out.startswith("https://neuroglancer-demo.appspot.com/#!http://127.0.0.1:8765/states/ng-")
    assert "--allow-origin https://neuroglancer-demo.appspot.com" in out.err


def test_link_of_a_missing_layer_raises_a_layer_error(tmp_path: Path) -> None:
    args = parser().parse_args(["link", str(tmp_path / "missing")])
    with pytest.raises(LayerError, match="missing"):
        args.func(args)


def test_view_defaults() -> None:
    args = parser().parse_args(["view", "a", "b"])
    assert (args.layers, args.port, args.bind, args.token, args.tasks) == (["a", "b"], 8765, "127.0.0.1", None, None)
    assert (args.state_dir, args.allow_origin) == (None, [])
    assert callable(args.func)


def test_view_refuses_a_bad_origin(viewer_fib25_layers) -> None:
    from exaconnect.errors import InputError

    args = parser().parse_args(["view", str(viewer_fib25_layers.image), "--port", "0", "--allow-origin", "https://x.org/path"])
    with pytest.raises(InputError, match="--allow-origin"):
        args.func(args)


def test_view_serves_until_interrupted(viewer_fib25_layers, tmp_path: Path) -> None:
    """Runs the `view` subcommand in a child process, as a person would, and stops it with Ctrl-C."""
    script = (
        "import argparse, sys\n"
        "from exaconnect.cli.view import register\n"
        "p = argparse.ArgumentParser(); register(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, "view", str(viewer_fib25_layers.image), "--port", "0", "--token", "tok"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    connection = None
    try:
        child.stdout.readline()  # "exaconnect viewer on http://127.0.0.1:PORT ..."
        url = child.stdout.readline().strip()
        assert url.endswith("/v/exaconnect/?token=tok")
        port = urllib.parse.urlsplit(url).port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/data/fib25_image/info?token=tok")
        response = connection.getresponse()
        assert response.status == 200
        response.read()  # the connection stays open (keep-alive), holding a worker
    finally:
        child.send_signal(signal.SIGINT)
        started = time.monotonic()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
        finally:
            if connection is not None:
                connection.close()
    assert child.returncode == 0
    assert time.monotonic() - started < 5, "an open browser connection delayed the exit"


def test_link_takes_an_annotation_layer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`exaconnect link IMAGE IMAGE/tile_outlines`: the montage's tile outlines come out as an annotation layer."""
    import neuroglancer
    import numpy as np
    from neuroglancer.write_annotations import AnnotationWriter

    from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer

    image = create_layer(str(tmp_path / "em"), LayerSpec("image", "uint8", (40, 40, 2), (4.0, 4.0, 40.0), (17, 29, 3),
                                                          (32, 32, 2)), Provenance(stage="montage"))
    image[:, :, :] = np.full((40, 40, 2, 1), 7, dtype=np.uint8)
    space = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=[4, 4, 40])
    writer = AnnotationWriter(space, "axis_aligned_bounding_box")
    writer.add_axis_aligned_bounding_box([17.5, 29, 3], [41.5, 53, 4], id=3000000)
    writer.write(tmp_path / "em" / "tile_outlines")
    args = parser().parse_args(["link", str(tmp_path / "em"), str(tmp_path / "em" / "tile_outlines"), "--long"])
    assert args.func(args) == 0
    state = json.loads(urllib.parse.unquote(capsys.readouterr().out.strip().split("#!", 1)[1]))
    assert [(layer["name"], layer["type"]) for layer in state["layers"]] == [("em", "image"), ("tile_outlines", "annotation")]
    assert state["layers"][1]["source"][0]["url"] == "precomputed://http://127.0.0.1:8765/data/tile_outlines"
