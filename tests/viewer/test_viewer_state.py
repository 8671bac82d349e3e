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


# -- short links (issue 12) ---------------------------------------------------------------------

def test_short_link_saves_the_state_beside_the_layers(viewer_fib25_layers) -> None:
    from exaconnect.viewer.links import short_link

    data = viewer_fib25_layers
    layers = [str(data.image), str(data.segmentation)]
    short = short_link(layers)
    folder = data.image.parent / "states"
    name = short.state_location.rsplit("/", 1)[-1]
    assert short.state_location == str(folder / name) and name.startswith("ng-") and name.endswith(".json")
    assert short.url == f"http://127.0.0.1:8765/v/exaconnect/#!http://127.0.0.1:8765/states/{name}"
    assert str(short) == short.url and len(short.url) < 120
    saved = json.loads((folder / name).read_text())
    assert saved == json.loads(urllib.parse.unquote(link(layers).split("#!", 1)[1]))
    assert short.long_url == link(layers)
    assert short_link(layers).url == short.url  # the same view, the same file


def test_short_link_state_dir_name_and_server(viewer_fib25_layers, tmp_path: Path) -> None:
    from exaconnect.viewer.links import short_link

    short = short_link([str(viewer_fib25_layers.image)], state_dir=tmp_path / "s", name="fib25.json",
                       server="http://localhost:9000", base_url="https://ng.example/")
    assert short.url == "https://ng.example/#!http://localhost:9000/states/fib25.json"
    saved = json.loads((tmp_path / "s" / "fib25.json").read_text())
    assert saved["layers"][0]["source"][0]["url"] == "precomputed://http://localhost:9000/data/fib25_image"
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(InputError, match="--name"):
            short_link([str(viewer_fib25_layers.image)], state_dir=tmp_path / "s", name=bad)
    with pytest.raises(InputError, match="--state-dir"):
        short_link([str(viewer_fib25_layers.image)], state_dir="https://example.org/states")


def _remote_layer(url: str) -> LayerInfo:
    info = {"type": "image", "data_type": "uint8", "num_channels": 1,
            "scales": [{"resolution": [8, 8, 40], "voxel_offset": [0, 0, 0], "size": [64, 64, 16],
                        "chunk_sizes": [[64, 64, 16]], "encoding": "raw", "key": "8_8_40"}]}
    return LayerInfo(url=url, kind=kinds.IMAGE, info=info)


def test_remote_layers_get_their_state_in_the_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """gs:// and s3:// are written with cloudfiles; mem:// stands in for a bucket here."""
    from cloudfiles import CloudFiles

    from exaconnect.viewer import links

    monkeypatch.setattr(links, "_STATE_STORES", ("gs://", "s3://", "mem://"))
    short = links.short_link([_remote_layer("mem://bucket/em/image")], statistics=False, name="v1")
    assert short.state_url == short.state_location == "mem://bucket/em/states/v1.json"
    assert short.url == "https://neuroglancer-demo.appspot.com/#!mem://bucket/em/states/v1.json"
    saved = json.loads(CloudFiles("mem://bucket/em/states").get("v1.json"))
    assert saved["layers"][0]["source"][0]["url"] == "precomputed://mem://bucket/em/image"


def test_unwritable_remote_state_names_the_place_and_the_ways_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from exaconnect.viewer import links

    with pytest.raises(LayerError, match="--state-dir.*--long"):
        links.short_link([_remote_layer("https://example.org/em/image")], statistics=False)

    class Refusing:
        def __init__(self, folder: str) -> None:
            pass

        def put(self, *args, **kwargs) -> None:
            raise PermissionError("403 Forbidden")

    import cloudfiles

    monkeypatch.setattr(cloudfiles, "CloudFiles", Refusing)
    with pytest.raises(LayerError, match=r"gs://bucket/em/states/.*403 Forbidden.*--state-dir"):
        links.short_link([_remote_layer("gs://bucket/em/image")], statistics=False)


# -- annotation collections (issue 22: the montage's tile outlines) -------------------------------

def _write_boxes(path: Path, color: bool = True) -> Path:
    """Two boxes off the origin, written with neuroglancer's own annotation writer."""
    from neuroglancer.write_annotations import AnnotationWriter

    space = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=[4, 4, 40])
    properties = [neuroglancer.AnnotationPropertySpec(id="color", type="rgb")] if color else []
    writer = AnnotationWriter(space, "axis_aligned_bounding_box", properties=properties)
    extra = {"color": (255, 0, 0)} if color else {}
    writer.add_axis_aligned_bounding_box([130.5, 210.25, 7], [174.5, 254.25, 8], id=7000001, **extra)
    writer.add_axis_aligned_bounding_box([160, 240, 9], [201, 281, 10], id=9000000, **extra)
    writer.write(path)
    return path


def test_an_annotation_collection_is_a_layer_with_geometry_from_its_bounds(tmp_path: Path) -> None:
    boxes = inspect_layer(str(_write_boxes(tmp_path / "boxes")))
    assert boxes.kind == kinds.ANNOTATION and boxes.name == "boxes" and not boxes.has_mesh
    assert boxes.resolution == pytest.approx((4.0, 4.0, 40.0))
    assert boxes.voxel_offset == (130, 210, 7) and boxes.size == (71, 71, 3)
    assert kinds.layer_kind({"@type": "neuroglancer_annotations_v1"}, "align") == kinds.ANNOTATION

    # Shown alone, the collection places the view: the centre of its bounds, its own voxel size.
    state = build_state([str(tmp_path / "boxes")], server="http://127.0.0.1:9999")
    (layer,) = state["layers"]
    assert layer["type"] == "annotation" and layer["source"][0]["url"] == "precomputed://http://127.0.0.1:9999/data/boxes"
    assert "prop_color()" in layer["shader"]  # drawn in the colours it carries
    assert state["position"] == [165.5, 245.5, 8.5] and state["dimensions"]["z"] == [4e-08, "m"]
    assert state["layout"] == "xy"
    plain = build_state([str(_write_boxes(tmp_path / "plain", color=False))])["layers"][0]
    assert plain["type"] == "annotation" and "shader" not in plain  # neuroglancer's default colour


def test_links_accept_an_annotation_layer_beside_an_image(tmp_path: Path) -> None:
    from exaconnect.viewer.links import short_link

    spec = LayerSpec("image", "uint8", (80, 80, 4), resolution=(4.0, 4.0, 40.0), voxel_offset=(128, 208, 7), chunk_size=(32, 32, 4))
    image = create_layer(str(tmp_path / "em"), spec, Provenance(stage="montage"))
    image[:, :, :] = np.full((80, 80, 4, 1), 50, dtype=np.uint8)
    boxes = _write_boxes(tmp_path / "em" / "tile_outlines")
    url = link([str(tmp_path / "em"), str(boxes)])
    state = neuroglancer.parse_url(url).to_json()
    assert [layer["type"] for layer in state["layers"]] == ["image", "annotation"]
    assert state["layers"][1]["source"][0]["url"] == "precomputed://http://127.0.0.1:8765/data/tile_outlines"
    short = short_link([str(tmp_path / "em"), str(boxes)], name="montage")
    assert short.state_location == str(tmp_path / "states" / "montage.json")
    assert json.loads(Path(short.state_location).read_text())["layers"][1]["type"] == "annotation"


def test_malformed_annotation_info_names_the_layer(tmp_path: Path) -> None:
    bad = tmp_path / "bad_boxes"
    bad.mkdir()
    (bad / "info").write_text(json.dumps({"@type": "neuroglancer_annotations_v1", "dimensions": {"x": [4e-9, "m"]}}))
    with pytest.raises(LayerError, match=rf"{bad}.*missing lower_bound"):
        inspect_layer(str(bad))
    _write_boxes(bad)
    info = json.loads((bad / "info").read_text())
    info["dimensions"]["z"] = [40, "parsecs"]
    (bad / "info").write_text(json.dumps(info))
    with pytest.raises(LayerError, match=rf"{bad}.*dimensions.*length unit"):
        link([str(bad)])
