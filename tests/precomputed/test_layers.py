import json

import numpy as np
import pytest

from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, layer_bounds, layer_url, open_layer, read_box, write_box


def tensorstore_read(url: str) -> np.ndarray:
    import tensorstore as ts

    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": url + "/", "scale_index": 0}).result()
    return np.asarray(store.read().result())[..., 0].transpose(2, 1, 0)  # x,y,z,c -> z,y,x


@pytest.mark.parametrize("layer_type,dtype,encoding", [
    ("image", "uint8", "raw"), ("image", "uint8", "jpeg"), ("image", "uint16", "raw"),
    ("segmentation", "uint32", "compressed_segmentation"), ("segmentation", "uint64", "compressed_segmentation"),
    ("segmentation", "uint32", "compresso"),
])
def test_layers_read_back_identically_through_tensorstore(tmp_path, layer_type, dtype, encoding):
    rng = np.random.default_rng(0)
    shape_zyx = (40, 70, 50)  # not a multiple of the chunk size: partial edge chunks
    if layer_type == "image":
        data = rng.integers(0, 255 if dtype == "uint8" else 4000, shape_zyx).astype(dtype)
    else:
        data = (rng.integers(0, 6, (5, 7, 5)).repeat(8, 0).repeat(10, 1).repeat(10, 2)).astype(dtype) * 1000
    spec = LayerSpec(layer_type, dtype, size=(50, 70, 40), resolution=(8, 8, 40), voxel_offset=(3, 5, 7),
                     chunk_size=(32, 32, 16), encoding=encoding)
    vol = create_layer(str(tmp_path / "layer"), spec, Provenance("test", {"k": 1}))
    box = spec.bounds
    write_box(vol, box, data)
    ours = read_box(open_layer(str(tmp_path / "layer")), box)
    if encoding == "compresso":
        # tensorstore's driver knows raw/png/jpeg/compressed_segmentation only; neuroglancer and
        # cloud-volume read compresso, so it stays an option, with compressed_segmentation the default.
        with pytest.raises(ValueError, match="compresso"):
            tensorstore_read(layer_url(str(tmp_path / "layer")))
    else:
        np.testing.assert_array_equal(ours, tensorstore_read(layer_url(str(tmp_path / "layer"))))
    if encoding != "jpeg":
        np.testing.assert_array_equal(ours, data)
    else:
        assert np.abs(ours.astype(int) - data).mean() < 60  # lossy, but the same decode in both readers


def test_provenance_records_stage_parameters_and_inputs(tmp_path):
    spec = LayerSpec("image", "uint8", size=(16, 16, 16))
    create_layer(str(tmp_path / "a"), spec, Provenance("ingest", {"source": "x.npy"}, ["x.npy"]))
    prov = json.loads((tmp_path / "a" / "provenance").read_text())
    step = prov["processing"][0]
    assert step["method"]["stage"] == "ingest" and step["method"]["parameters"] == {"source": "x.npy"}
    assert step["by"].startswith("exaconnect ") and prov["sources"] == ["x.npy"]


def test_bad_layers_are_reported_clearly(tmp_path):
    with pytest.raises(LayerError, match="does not exist"):
        open_layer(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "info").write_text("{not json")
    with pytest.raises(LayerError, match="not valid JSON"):
        open_layer(str(tmp_path / "broken"))
    (tmp_path / "broken" / "info").write_text(json.dumps({"type": "image"}))
    with pytest.raises(LayerError, match="missing key"):
        open_layer(str(tmp_path / "broken"))
    spec = LayerSpec("image", "uint8", size=(16, 16, 16))
    create_layer(str(tmp_path / "img"), spec, Provenance("t"))
    with pytest.raises(LayerError, match="expected a segmentation layer"):
        open_layer(str(tmp_path / "img"), layer_type="segmentation")
    with pytest.raises(LayerError, match="different geometry"):
        create_layer(str(tmp_path / "img"), LayerSpec("image", "uint8", size=(8, 8, 8)), Provenance("t"))
    with pytest.raises(InputError, match="not supported"):
        LayerSpec("segmentation", "float32", size=(8, 8, 8))
    with pytest.raises(InputError, match="jpeg"):
        LayerSpec("image", "uint16", size=(8, 8, 8), encoding="jpeg")
    assert layer_bounds(open_layer(str(tmp_path / "img"))) == Box((0, 0, 0), (16, 16, 16))


# ---------------------------------------------------------------- boxes off the chunk grid (issue 13, item 12)

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@st.composite
def layers_and_boxes(draw):
    """A layer (any voxel offset, a size that need not be a multiple of the chunk) and a few
    boxes inside it, off the origin and off the chunk grid."""
    chunk = tuple(draw(st.sampled_from([4, 8, 16])) for _ in range(3))
    size = tuple(draw(st.integers(3, 40)) for _ in range(3))
    offset = tuple(draw(st.integers(-20, 20)) for _ in range(3))
    boxes = []
    for _ in range(draw(st.integers(1, 3))):
        start = tuple(draw(st.integers(0, s - 1)) for s in size)
        stop = tuple(draw(st.integers(a + 1, s)) for a, s in zip(start, size))
        boxes.append(Box(start, stop).translate(offset))
    return chunk, size, offset, boxes


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layers_and_boxes(), encoding=st.sampled_from(["compressed_segmentation", "raw"]))
def test_write_box_takes_any_box_inside_the_layer(tmp_path_factory, case, encoding):
    chunk, size, offset, boxes = case
    path = tmp_path_factory.mktemp("offgrid") / "seg"
    spec = LayerSpec("segmentation", "uint32", size=size, voxel_offset=offset, chunk_size=chunk, encoding=encoding)
    vol = create_layer(str(path), spec, Provenance("test"))
    expected = np.zeros(tuple(reversed(size)), np.uint32)  # [z, y, x] model of the layer
    rng = np.random.default_rng(sum(size))
    for box in boxes:
        data = rng.integers(1, 1000, tuple(reversed(box.shape))).astype(np.uint32)
        write_box(vol, box, data)
        local = box.translate(tuple(-o for o in offset))
        expected[local.start[2]:local.stop[2], local.start[1]:local.stop[1], local.start[0]:local.stop[0]] = data
        np.testing.assert_array_equal(read_box(open_layer(str(path)), box), data)
    # Only chunks the boxes touched exist; read them as zeros elsewhere and compare everything.
    np.testing.assert_array_equal(read_box(open_layer(str(path), fill_missing=True), spec.bounds), expected)


def test_write_box_outside_the_layer_is_refused(tmp_path):
    vol = create_layer(str(tmp_path / "l"), LayerSpec("image", "uint8", size=(20, 20, 20), voxel_offset=(5, 5, 5)),
                       Provenance("t"))
    with pytest.raises(InputError, match="outside the layer bounds"):
        write_box(vol, Box((0, 5, 5), (10, 10, 10)), np.zeros((5, 5, 10), np.uint8))


def test_segment_box_writes_a_box_off_the_chunk_grid(tmp_path, monkeypatch):
    """`exaconnect segment --bbox 64,64,64,160,160,160` on 64^3 chunks used to fail at write time
    (EmptyVolumeException on the far partial chunk, after the whole inference)."""
    from types import SimpleNamespace

    import exaconnect.ffn.inference as inference
    import exaconnect.ffn.predictor as predictor
    from exaconnect.segment import segment_box

    from exaconnect.precomputed.verify import verify_layer

    box = Box((64, 64, 64), (160, 160, 160))

    def fake_labels(shape):
        return (np.arange(np.prod(shape)).reshape(shape) % 7 + 1).astype(np.uint64)

    labels = fake_labels(tuple(reversed(box.shape)))
    monkeypatch.setattr(predictor, "load_model", lambda *a, **k: "model")
    monkeypatch.setattr(inference, "segment_subvolume", lambda image, model, progress=True: SimpleNamespace(
        labels=fake_labels(image.shape), probabilities=(fake_labels(image.shape) * 30).astype(np.uint8),
        objects=[1, 2, 3], counters={}))
    image = create_layer(str(tmp_path / "img"), LayerSpec("image", "uint8", size=(250, 250, 250), chunk_size=(64, 64, 64)),
                         Provenance("t"))
    write_box(image, Box((0, 0, 0), (250, 250, 250)), np.full((250, 250, 250), 100, np.uint8))
    summary = segment_box(str(tmp_path / "img"), str(tmp_path / "seg"), "model", box,
                          probabilities_layer=str(tmp_path / "prob"), progress=False)
    assert summary["bbox"] == str(box)
    np.testing.assert_array_equal(read_box(open_layer(str(tmp_path / "seg")), box), labels)
    np.testing.assert_array_equal(read_box(open_layer(str(tmp_path / "prob")), box), (labels * 30).astype(np.uint8))
    whole = read_box(open_layer(str(tmp_path / "seg"), fill_missing=True), Box((0, 0, 0), (250, 250, 250)))
    assert int(whole.sum()) == int(labels.sum())  # zeros outside the box in the new edge chunks
    assert verify_layer(str(tmp_path / "seg"), bbox=box)["ok"]  # only the box was written
    # A second box sharing the far edge chunks keeps the first box's voxels there, and the
    # rewritten chunks verify against their latest checksums.
    second = Box((150, 100, 140), (203, 171, 250))
    segment_box(str(tmp_path / "img"), str(tmp_path / "seg"), "model", second, progress=False)
    seg = open_layer(str(tmp_path / "seg"), fill_missing=True)
    np.testing.assert_array_equal(read_box(seg, second), fake_labels(tuple(reversed(second.shape))))
    kept = Box((64, 64, 64), (150, 160, 160))
    np.testing.assert_array_equal(read_box(seg, kept), labels[:, :, :86])
    for written in (box, second):
        report = verify_layer(str(tmp_path / "seg"), bbox=written)
        assert report["ok"] and report["mips"][0]["checked_against_manifest"] == report["mips"][0]["chunks"], report


def test_nan_or_infinite_resolution_is_refused(tmp_path):
    for resolution in ((float("nan"), 4, 4), (float("inf"), 4, 4), (4, 4, -1)):
        with pytest.raises(InputError, match="resolution"):
            LayerSpec("image", "uint8", size=(8, 8, 8), resolution=resolution)


@pytest.mark.parametrize("stage", ["downsample", "mesh"])
def test_provenance_merges_with_records_written_since_the_layer_was_opened(tmp_path, stage):
    from exaconnect.precomputed.layers import add_provenance

    create_layer(str(tmp_path / "a"), LayerSpec("image", "uint8", size=(16, 16, 16)), Provenance("ingest"))
    stale = open_layer(str(tmp_path / "a"))
    other = open_layer(str(tmp_path / "a"))
    other.provenance.processing.append({"method": {"task": "SomeoneElse"}})
    other.commit_provenance()
    add_provenance(stale, Provenance(stage))
    methods = [r["method"] for r in json.loads((tmp_path / "a" / "provenance").read_text())["processing"]]
    assert [m.get("stage") or m.get("task") for m in methods] == ["ingest", "SomeoneElse", stage]
