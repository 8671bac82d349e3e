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
