"""`exaconnect link` / `exaconnect view` as registered by `viewer.cli.add_cli`."""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from exaconnect.errors import LayerError
from exaconnect.viewer.cli import add_cli


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="exaconnect")
    add_cli(top.add_subparsers(dest="command", required=True))
    return top


def test_link_prints_a_link(viewer_fib25_layers, capsys: pytest.CaptureFixture) -> None:
    args = parser().parse_args(["link", str(viewer_fib25_layers.image), "--base-url", "https://ng.example/"])
    assert args.func(args) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith("https://ng.example/#!")
    state = json.loads(urllib.parse.unquote(url.split("#!", 1)[1]))
    assert state["layers"][0]["source"][0]["url"] == "precomputed://http://127.0.0.1:8765/data/fib25_image"


def test_link_of_a_missing_layer_raises_a_layer_error(tmp_path: Path) -> None:
    args = parser().parse_args(["link", str(tmp_path / "missing")])
    with pytest.raises(LayerError, match="missing"):
        args.func(args)


def test_view_defaults() -> None:
    args = parser().parse_args(["view", "a", "b"])
    assert (args.layers, args.port, args.bind, args.token, args.tasks) == (["a", "b"], 8765, "127.0.0.1", None, None)
    assert callable(args.func)


def test_view_serves_until_interrupted(viewer_fib25_layers, tmp_path: Path) -> None:
    """Runs the `view` subcommand in a child process, as a person would, and stops it with Ctrl-C."""
    script = (
        "import argparse, sys\n"
        "from exaconnect.viewer.cli import add_cli\n"
        "p = argparse.ArgumentParser(); add_cli(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, "view", str(viewer_fib25_layers.image), "--port", "0", "--token", "tok"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        child.stdout.readline()  # "exaconnect viewer on http://127.0.0.1:PORT ..."
        url = child.stdout.readline().strip()
        assert url.endswith("/v/exaconnect/?token=tok")
        port = urllib.parse.urlsplit(url).port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/data/fib25_image/info?token=tok")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
    assert child.returncode == 0
