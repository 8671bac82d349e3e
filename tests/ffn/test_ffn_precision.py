"""Reduced-precision FFN inference (`inference.precision`): validation, closeness to float32,
agreement with an independent numpy emulation, and a canvas that stays float32.

The published checkpoint's accuracy and speed at each precision are measured in
bench/bench_ffn_precision.py, not here."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_ffn
from exaconnect.cli import main
from exaconnect.errors import InputError
from exaconnect.ffn import numpy_forward
from exaconnect.ffn.canvas import Canvas
from exaconnect.ffn.config import InferenceOptions
from exaconnect.ffn.inference import segment_subvolume
from exaconnect.ffn.model import ConvStack3D
from exaconnect.ffn.predictor import load_model
from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

REDUCED = ("bfloat16", "float16")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return make_tiny_ffn(tmp_path_factory.mktemp("precision") / "tiny_ffn")


@pytest.fixture(scope="module")
def predictors(tiny_path) -> dict:
    return {p: load_model(tiny_path, config_overrides={"precision": p}, device="cpu")
            for p in ("float32", *REDUCED)}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    # Odd, unequal sides: nothing may depend on a cube or on the chunk grid.
    return synthetic_volume(SyntheticSpec(shape=(29, 35, 31), neurites=8, seed=2))[0]


def _patch(predictor, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fov = predictor.model_config.fov_zyx
    image = rng.normal(size=(2, *fov)).astype(np.float32)
    mask = rng.normal(scale=3.0, size=(2, *fov)).astype(np.float32)
    return image, mask


@pytest.mark.parametrize("make", [
    lambda path: InferenceOptions(precision="fp8"),
    lambda path: load_model(path, config_overrides={"precision": "half"}, device="cpu"),
    lambda path: load_model(path, config_overrides={"inference": {"precision": "int8"}}, device="cpu"),
    lambda path: ConvStack3D(load_model(path, device="cpu").model_config, precision="float64"),
])
def test_an_unknown_precision_is_an_input_error_naming_the_option(tiny_path, make):
    with pytest.raises(InputError, match="precision=.*expected one of"):
        make(tiny_path)


def test_the_option_reaches_the_network(predictors):
    for precision, predictor in predictors.items():
        assert predictor.precision == precision
        assert predictor.config.inference.precision == precision
    assert InferenceOptions().precision == "float32"


@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_precision_is_close_to_float32_but_not_float32(predictors, precision):
    image, mask = _patch(predictors["float32"])
    wide = predictors["float32"](image, mask)
    narrow = predictors[precision](image, mask)
    assert narrow.dtype == np.float32 and narrow.shape == wide.shape
    scale = np.abs(wide).max()
    assert np.abs(narrow - wide).max() < 0.05 * scale
    # Equal to float32 would mean the option changed nothing.
    assert not np.array_equal(narrow, wide)


def test_bfloat16_rounds_what_the_numpy_emulation_rounds(predictors):
    """The TF model in bfloat16 agrees with numpy_forward rounding conv inputs, kernels and
    outputs to bfloat16 far better than either agrees with the unrounded pass (measured 5e-8
    of the output scale, on TF 2.15 and 2.21 alike). float16 is left out: TF 2.21 convolves it
    in oneDNN with float32 sums, TF 2.15 in Eigen with float16 sums, so no one emulation fits."""
    precision, tolerance = "bfloat16", 1e-3
    predictor = predictors[precision]
    image, mask = _patch(predictor, seed=1)
    out = predictor(image[:1], mask[:1])[0]
    weights, biases = predictor.network.numpy_weights()
    depth = predictor.model_config.depth
    emulated = numpy_forward.forward(image[0], mask[0], weights, biases, depth, precision=precision)
    exact = numpy_forward.forward(image[0], mask[0], weights, biases, depth)
    scale = np.abs(exact).max()
    assert np.abs(out - emulated).max() < tolerance * scale
    assert np.abs(out - exact).max() > 2 * tolerance * scale


def test_numpy_emulation_rejects_an_unknown_precision(predictors):
    predictor = predictors["float32"]
    image, mask = _patch(predictor)
    weights, biases = predictor.network.numpy_weights()
    with pytest.raises(InputError, match="precision='int4'"):
        numpy_forward.forward(image[0], mask[0], weights, biases, 2, precision="int4")


@pytest.mark.parametrize("precision", REDUCED)
def test_the_canvas_stays_float32(predictors, image, precision):
    predictor = predictors[precision]
    options = predictor.config.inference
    canvas = Canvas(image, predictor.model_config, options)
    steps = canvas.segment_all()
    request, received = next(steps), []
    try:
        while True:
            logits = predictor(request.image[None], request.mask_logits[None])[0]
            received.append(logits.dtype)
            assert request.mask_logits.dtype == np.float32 and request.image.dtype == np.float32
            request = steps.send(logits)
    except StopIteration:
        pass
    assert received and set(received) == {np.dtype(np.float32)}
    assert canvas.seed.dtype == np.float32
    assert canvas.objects, "the tiny model should grow at least one object on this volume"


@pytest.mark.parametrize("precision", REDUCED)
def test_options_precision_overrides_the_loaded_network(predictors, image, precision):
    """`segment_subvolume(image, float32 model, options with precision=P)` computes at P."""
    at_p = segment_subvolume(image, predictors[precision])
    wide = segment_subvolume(image, predictors["float32"])
    asked = segment_subvolume(image, predictors["float32"], replace(predictors["float32"].config.inference,
                                                                     precision=precision))
    np.testing.assert_array_equal(asked.probabilities, at_p.probabilities)
    np.testing.assert_array_equal(asked.labels, at_p.labels)
    # The tiny model's reduced-precision probabilities differ from float32 somewhere, so the
    # equality above would fail had the option been ignored.
    assert not np.array_equal(at_p.probabilities, wide.probabilities)
    # And close: a handful of voxels change label.
    assert np.mean(at_p.labels == wide.labels) > 0.99


def test_cli_set_inference_precision_reaches_segment_box(tmp_path, tiny_path, image, capsys):
    np.save(tmp_path / "img.npy", image)
    assert main(["ingest", "run", str(tmp_path / "img.npy"), str(tmp_path / "image"), "--resolution", "10,10,10"]) == 0
    capsys.readouterr()
    # A box off the origin and off the chunk grid, x y z.
    bbox = "3,2,1,31,33,28"
    code = main(["segment", "box", str(tmp_path / "image"), str(tmp_path / "seg"), "--model", tiny_path,
                 "--bbox", bbox, "--set", "inference.precision=bfloat16", "--counters", str(tmp_path / "c.json")])
    assert code == 0, capsys.readouterr().err
    import json

    assert json.loads((tmp_path / "c.json").read_text())["precision"] == "bfloat16"
    code = main(["segment", "box", str(tmp_path / "image"), str(tmp_path / "seg2"), "--model", tiny_path,
                 "--bbox", bbox, "--set", "inference.precision=fp8"])
    err = capsys.readouterr().err
    assert code == 2 and "precision='fp8'" in err
    assert not Path(tmp_path / "seg2").exists()


def test_float16_on_the_cpu_is_loaded_with_a_warning(tiny_path, caplog):
    from exaconnect.ffn.device import precision_warning

    with caplog.at_level("WARNING", logger="exaconnect.ffn.predictor"):
        load_model(tiny_path, config_overrides={"precision": "float16"}, device="cpu")
    assert any("precision='float16'" in r.getMessage() and "slower than float32" in r.getMessage()
               for r in caplog.records)
    assert precision_warning("/device:CPU:0", "bfloat16") is None
    assert precision_warning("/device:GPU:0", "float16") is None
