"""The TF network: shapes, equality with the independent numpy pass, checkpoint round trips."""

from pathlib import Path

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.ffn import numpy_forward
from exaconnect.ffn.checkpoint import import_reference, load_network, save_network
from exaconnect.ffn.config import FFNConfig, InferenceOptions, ModelConfig
from exaconnect.ffn.model import ConvStack3D, layer_names
from exaconnect.ffn.predictor import load_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
REFERENCE_CKPT = SHARED / "models" / "ffn-fib25" / "model.ckpt-27465036"
SMALL = ModelConfig(depth=3, fov_size=(9, 11, 7), deltas=(2, 2, 2), features=4)


def _inputs(config: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = config.fov_zyx
    image = rng.normal(size=shape).astype(np.float32)
    mask = rng.normal(scale=3.0, size=shape).astype(np.float32)
    return image, mask


def _randomized(config: ModelConfig) -> ConvStack3D:
    model = ConvStack3D(config)
    rng = np.random.default_rng(1)
    weights, biases = model.numpy_weights()
    model.assign(
        {k: rng.normal(scale=0.3, size=v.shape) for k, v in weights.items()},
        {k: rng.normal(scale=0.1, size=v.shape) for k, v in biases.items()},
    )
    return model


def test_layer_names_match_the_reference_scopes():
    names = layer_names(12)
    assert names[:2] == ["conv0_a", "conv0_b"] and names[-1] == "conv_lom"
    assert len(names) == 2 + 2 * 11 + 1


def test_output_shape_and_batching():
    model = _randomized(SMALL)
    image, mask = _inputs(SMALL)
    batch_i = np.stack([image, image * 0.5])[..., None]
    batch_m = np.stack([mask, -mask])[..., None]
    out = model.predict(batch_i, batch_m).numpy()
    assert out.shape == (2, *SMALL.fov_zyx, 1)
    single = model.predict(batch_i[1:], batch_m[1:]).numpy()
    np.testing.assert_allclose(out[1:], single, atol=1e-5)


def test_tf_model_equals_numpy_forward_pass():
    model = _randomized(SMALL)
    image, mask = _inputs(SMALL)
    out = model.predict(image[None, ..., None], mask[None, ..., None]).numpy()[0, ..., 0]
    weights, biases = model.numpy_weights()
    expected = numpy_forward.forward(image, mask, weights, biases, SMALL.depth)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_own_checkpoint_round_trip(tmp_path):
    model = _randomized(SMALL)
    config = FFNConfig(model=SMALL, inference=InferenceOptions(min_segment_size=5))
    save_network(model, tmp_path / "ckpt", config)
    restored, restored_config = load_network(tmp_path / "ckpt")
    assert restored_config == config
    image, mask = _inputs(SMALL)
    a = model.predict(image[None, ..., None], mask[None, ..., None]).numpy()
    b = restored.predict(image[None, ..., None], mask[None, ..., None]).numpy()
    np.testing.assert_array_equal(a, b)


def test_load_rejects_a_path_that_is_no_checkpoint(tmp_path):
    with pytest.raises(InputError, match="neither"):
        load_network(tmp_path / "nothing")


@pytest.fixture(scope="module")
def reference_model():
    if not REFERENCE_CKPT.with_name(REFERENCE_CKPT.name + ".index").is_file():
        pytest.skip(f"reference FFN checkpoint absent: {REFERENCE_CKPT} (../shared not present)")
    return import_reference(REFERENCE_CKPT)


def test_reference_import_equals_numpy_forward_pass(reference_model):
    config = reference_model.config
    assert (config.depth, config.features) == (12, 32)
    rng = np.random.default_rng(7)
    image = ((rng.integers(60, 200, size=config.fov_zyx) - 128.0) / 33.0).astype(np.float32)
    mask = np.full(config.fov_zyx, -2.944, dtype=np.float32)
    mask[16, 16, 16] = 2.944
    out = reference_model.predict(image[None, ..., None], mask[None, ..., None]).numpy()[0, ..., 0]
    weights, biases = reference_model.numpy_weights()
    expected = numpy_forward.forward(image, mask, weights, biases, config.depth)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=2e-4)
    # The prediction is not trivial: the network moved the mask well away from its input.
    assert np.abs(expected - mask).max() > 1.0


def test_load_model_accepts_reference_prefix_and_own_directory(reference_model, tmp_path):
    predictor = load_model(REFERENCE_CKPT, config_overrides={"min_segment_size": 500}, device="cpu")
    assert predictor.config.inference.min_segment_size == 500
    save_network(predictor.network, tmp_path / "ours", predictor.config)
    again = load_model(tmp_path / "ours", device="cpu")
    assert again.config == predictor.config
    image = np.zeros((2, 33, 33, 33), np.float32)
    mask = np.full((2, 33, 33, 33), -2.944, np.float32)
    np.testing.assert_array_equal(predictor(image, mask), again(image, mask))


def _small_predictor(**kwargs):
    from exaconnect.ffn.predictor import Predictor

    return Predictor(_randomized(SMALL), FFNConfig(model=SMALL), **kwargs)


def test_reduced_precision_and_xla_agree_with_float32():
    from exaconnect.ffn.predictor import with_precision

    predictor = _small_predictor()
    image, mask = _inputs(SMALL)
    reference = predictor(image[None], mask[None])
    bf16 = with_precision(predictor, "bfloat16")
    assert bf16.config.inference.precision == "bfloat16"
    low = bf16(image[None], mask[None])
    assert low.dtype == np.float32
    # bfloat16 keeps ~3 significant digits: close, but not equal.
    np.testing.assert_allclose(low, reference, atol=0.1 * np.abs(reference).max())
    xla = _small_predictor(jit_compile=True)
    np.testing.assert_allclose(xla(image[None], mask[None]), reference, rtol=1e-4, atol=1e-4)
