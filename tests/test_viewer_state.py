"""Viewer state and links for real layers: layer kinds, contrast, position, segments, URL format."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import neuroglancer
import numpy as np
import pytest

from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer
from exaconnect.viewer import layers as kinds
from exaconnect.viewer.layers import LayerInfo, inspect_layer
from exaconnect.viewer.links import link, state_link
from exaconnect.viewer.state import build_state


def test_fib25_state_has_image_and_meshed_segmentation(viewer_fib25_layers) -> None:
    data = viewer_fib25_layers
    state = build_state([str(data.image), f"file://{data.segmentation}"], server="http://127.0.0.1:9999")
    image, segmentation = state["layers"]
    assert image["type"] == "image" and segmentation["type"] == "segmentation"
    assert image["name"] == "fib25_image" and segmentation["name"] == "fib25_groundtruth"
    assert image["source"][0]["url"] == "precomputed://http://127.0.0.1:9999/data/fib25_image"

    # Contrast: the 1st/99th percentile of the (single-mip) sample, which here is the whole crop.
    low, high = image["shaderControls"]["normalized"]["range"]
    assert (low, high) == tuple(float(v) for v in np.percentile(data.image_zyx, [1, 99]))
    assert "invlerp" in image["shader"]

    # The selected segments are the largest bodies of the crop, so their meshes fill the 3D view.
    ids, counts = np.unique(data.segmentation_zyx, return_counts=True)
    largest = [int(i) for i in ids[np.argsort(-counts, kind="stable")] if i != 0][:12]
    assert [int(s) for s in segmentation["segments"]] == largest
    mesh_dir = inspect_layer(str(data.segmentation)).info["mesh"]
    assert all((data.segmentation / mesh_dir / f"{s}:0").is_file() for s in largest)

    assert state["position"] == [64.5, 64.5, 64.5]
    assert state["dimensions"] == {"x": [1e-08, "m"], "y": [1e-08, "m"], "z": [1e-08, "m"]}
    assert state["layout"] == "xy-3d" and state["showSlices"] is False
    # The state is valid for neuroglancer's own parser.
    assert neuroglancer.ViewerState(state).layers[1].type == "segmentation"


def test_kinds_from_info_and_provenance_stage(tmp_path: Path) -> None:
    spec = LayerSpec("image", "float32", (16, 16, 8), resolution=(4.0, 4.0, 40.0), voxel_offset=(100, 200, 10), chunk_size=(16, 16, 8))
    probability = create_layer(str(tmp_path / "prob"), spec, Provenance(stage="ffn_probability"))
    probability[:, :, :] = np.linspace(0, 1, 16 * 16 * 8, dtype=np.float32).reshape(16, 16, 8, 1)
    aligned = create_layer(str(tmp_path / "aligned"), LayerSpec("image", "uint8", (16, 16, 8), chunk_size=(16, 16, 8)), Provenance(stage="align"))
    aligned[:, :, :] = np.full((16, 16, 8, 1), 9, dtype=np.uint8)

    assert inspect_layer(str(tmp_path / "prob")).kind == kinds.PROBABILITY
    assert inspect_layer(str(tmp_path / "aligned")).kind == kinds.ALIGNMENT
    state = build_state([str(tmp_path / "prob"), str(tmp_path / "aligned")])
    prob, align = state["layers"]
    assert prob["shaderControls"]["probability"]["range"] == [0.0, 1.0]  # absolute, not a percentile
    assert "colormapJet" in prob["shader"]
    assert align["shaderControls"]["normalized"]["range"] == [9.0, 10.0]  # constant data widened
    # Position and dimensions come from the first layer (anisotropic, offset).
    assert state["position"] == [108.5, 208.5, 14.5]
    assert state["dimensions"]["z"] == [4e-08, "m"]
    assert state["layout"] == "xy" and state["showSlices"] is True


def test_multichannel_image_gets_one_invlerp_per_channel(tmp_path: Path) -> None:
    vol = create_layer(
        str(tmp_path / "rgb"),
        LayerSpec("image", "uint8", (8, 8, 8), chunk_size=(8, 8, 8), num_channels=3),
        Provenance(stage="ingest"),
    )
    data = np.zeros((8, 8, 8, 3), dtype=np.uint8)
    data[..., 0], data[..., 1], data[..., 2] = 10, 20, 30
    data[0, 0, 0] = (0, 0, 0)
    vol[:, :, :] = data
    (layer,) = build_state([str(tmp_path / "rgb")])["layers"]
    assert "invlerp red(channel=0)" in layer["shader"] and "invlerp blue(channel=2)" in layer["shader"]
    assert layer["shaderControls"]["green"] == {"range": [20.0, 21.0], "channel": [1]}
    assert neuroglancer.ViewerState({"layers": [dict(layer, name="rgb")]}).layers[0].type == "image"


def test_link_puts_the_state_in_the_fragment(viewer_fib25_layers) -> None:
    data = viewer_fib25_layers
    url = link([str(data.image), str(data.segmentation)])
    # Local layers need our server; by default that is `exaconnect view` on port 8765.
    assert url.startswith("http://127.0.0.1:8765/v/exaconnect/#!")
    state = neuroglancer.parse_url(url).to_json()
    assert [layer["type"] for layer in state["layers"]] == ["image", "segmentation"]
    raw = json.loads(urllib.parse.unquote(url.split("#!", 1)[1]))
    assert raw["layers"][1]["source"][0]["url"] == "precomputed://http://127.0.0.1:8765/data/fib25_groundtruth"
    other = link([str(data.image)], base_url="https://example.org/ng/", server="http://10.0.0.5:9000")
    assert other.startswith("https://example.org/ng/#!") and "http://10.0.0.5:9000/data/fib25_image" in other


def test_remote_layers_link_directly_to_the_public_client(viewer_fib25_layers) -> None:
    # A gs:// layer cannot be read here (no network); its info is taken from a local twin.
    info = inspect_layer(str(viewer_fib25_layers.segmentation)).info
    remote = LayerInfo(url="gs://bucket/fib25/segmentation", kind=kinds.SEGMENTATION, info=info)
    url = state_link([remote], statistics=False)
    assert url.startswith("https://neuroglancer-demo.appspot.com/#!")
    state = neuroglancer.parse_url(url).to_json()
    assert state["layers"][0]["source"][0]["url"] == "precomputed://gs://bucket/fib25/segmentation"


def test_layer_errors_name_the_layer(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match=str(tmp_path / "nothing")):
        build_state([str(tmp_path / "nothing")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "info").write_text("{not json")
    with pytest.raises(LayerError, match=str(tmp_path / "bad")):
        link([str(tmp_path / "bad")])
    with pytest.raises(InputError, match="no layers"):
        build_state([])


def test_bad_base_url_is_refused(viewer_fib25_layers) -> None:
    with pytest.raises(InputError, match="--base-url"):
        link([str(viewer_fib25_layers.image)], base_url="neuroglancer.example#x")
