"""FFN training loop: FOV movement inside examples, learning, checkpoints, resume, fine-tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.ffn.training.config import train_config_from_dict
from exaconnect.ffn.training.loop import ExampleWalk, WalkSettings, train

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
REFERENCE_CKPT = SHARED / "models" / "ffn-fib25" / "model.ckpt-27465036"

SMALL_MODEL = {"depth": 2, "fov_size": [11, 11, 11], "deltas": [3, 3, 3], "features": 8}


def small_config(out_dir, **training):
    opts = {"out_dir": str(out_dir), "batch_size": 4, "max_steps": 20, "summary_every_steps": 5,
            "validation_every_steps": 1000, "validation_examples": 4, "progress": False,
            "checkpoint_every_steps": 1000}
    opts.update(training)
    volume = {"name": "syn", "image": "synthetic:3", "labels": "synthetic:3:labels"}
    return train_config_from_dict({
        "model": SMALL_MODEL,
        "data": {"volumes": [volume], "validation_volumes": [{**volume, "name": "val"}], "min_size": 500,
                 "cache_dir": str(Path(out_dir).parent / "partitions")},
        "optimizer": {"name": "adam", "learning_rate": 0.003},
        "training": opts,
    })


SETTINGS = WalkSettings((5, 5, 5), (2, 2, 2), 1, "fixed", move_logit=2.197, init_logit=2.944, pad_logit=-2.944)


def test_fixed_policy_moves_only_where_the_prediction_allows():
    image = np.zeros((9, 9, 9), np.float32)
    mask = np.ones((9, 9, 9), bool)
    walk = ExampleWalk(image, mask, SETTINGS, 0.05, np.random.default_rng(0))
    offsets = walk.offsets()
    assert next(offsets) == (0, 0, 0)
    # The prediction leaves the canvas below threshold everywhere off-centre: no moves.
    walk.update((0, 0, 0), np.full((5, 5, 5), -1.0, np.float32))
    assert list(offsets) == []

    walk = ExampleWalk(image, mask, SETTINGS, 0.05, np.random.default_rng(0))
    offsets = walk.offsets()
    first = next(offsets)
    prediction = np.full((5, 5, 5), -1.0, np.float32)
    prediction[2, 2, 4] = 5.0  # +x face reaches the threshold
    prediction[0, 2, 2] = 5.0  # -z face too
    walk.update(first, prediction)
    assert sorted(offsets) == [(-2, 0, 0), (0, 0, 2)]
    # Soft targets.
    assert set(np.unique(walk.target)) == {np.float32(0.95)}


def test_all_26_neighbours_when_everything_is_inside():
    walk = ExampleWalk(np.zeros((9, 9, 9), np.float32), np.ones((9, 9, 9), bool), SETTINGS, 0.05,
                       np.random.default_rng(1))
    seen = []
    for offset in walk.offsets():
        seen.append(offset)
        walk.update(offset, np.full((5, 5, 5), 4.0, np.float32))
    assert seen[0] == (0, 0, 0) and len(seen) == 27 and len(set(seen)) == 27


def test_max_pred_policy_follows_the_object():
    settings = WalkSettings((5, 5, 5), (2, 2, 2), 1, "max_pred", 2.197, 2.944, -2.944)
    mask = np.zeros((9, 9, 9), bool)
    mask[4, 4, :] = True  # the object runs along x only
    walk = ExampleWalk(np.zeros((9, 9, 9), np.float32), mask, settings, 0.05, np.random.default_rng(0))
    seen = []
    for offset in walk.offsets():
        seen.append(offset)
        # A perfect network: high inside the object, low elsewhere.
        walk.update(offset, np.where(walk.crops(offset)[2] > 0.5, 4.0, -1.0).astype(np.float32))
    assert seen[0] == (0, 0, 0)
    assert sorted(seen[1:]) == [(0, 0, -2), (0, 0, 2)]


def test_training_learns_checkpoints_and_resumes(tmp_path):
    import tensorflow as tf

    from exaconnect.ffn import load_model
    from exaconnect.ffn.checkpoint import load_network
    from exaconnect.ffn.training.monitor import read_metrics

    config = small_config(tmp_path / "run", max_steps=60)
    result = train(config)
    assert result.step == 60 and result.resumed_from == 0
    records = [r for r in read_metrics(result.out_dir) if r["kind"] == "train"]
    assert len(records) == 12
    assert np.mean([r["loss"] for r in records[-3:]]) < 0.75 * np.mean([r["loss"] for r in records[:2]])
    assert (result.out_dir / "training.png").is_file()
    assert list((result.out_dir / "tensorboard").glob("events.out.tfevents.*"))
    validation = [r for r in read_metrics(result.out_dir) if r["kind"] == "validation"]
    assert validation and 0.0 <= validation[-1]["f1"] <= 1.0

    # The exported model is what inference loads.
    network, _ = load_network(result.model_dir)
    predictor = load_model(result.model_dir, device="cpu")
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 11, 11, 11)).astype(np.float32)
    mask = rng.normal(size=(2, 11, 11, 11)).astype(np.float32)
    out = predictor(image, mask)
    direct = network._forward(tf.constant(image[..., None]), tf.constant(mask[..., None])).numpy()[..., 0]
    np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-5)
    assert predictor.config.inference.image_mean == config.data.image_mean

    # Resume: a second run continues from the saved step with the saved weights and optimizer.
    saved_weights, _ = network.numpy_weights()
    resumed = train(small_config(tmp_path / "run", max_steps=65))
    assert resumed.resumed_from == 60 and resumed.step == 65 and resumed.steps_run == 5
    state = tf.train.load_checkpoint(str(tmp_path / "run" / "train_state"))
    assert int(state.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == 65
    moved, _ = load_network(resumed.model_dir)[0].numpy_weights()
    change = max(np.abs(moved[k] - saved_weights[k]).max() for k in saved_weights)
    assert 0 < change < 0.1  # five more small Adam steps, not a fresh start


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    result = train(small_config(tmp_path / "timed", max_steps=10**6, max_minutes=0.05))
    assert 0 < result.step < 10**6
    assert (tmp_path / "timed" / "train_state" / f"ckpt-{result.step}.index").is_file()


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    from exaconnect.ffn.checkpoint import load_network

    first = train(small_config(tmp_path / "base", max_steps=5))
    base, _ = load_network(first.model_dir)
    config = small_config(tmp_path / "tuned", max_steps=1, init_checkpoint=str(first.model_dir))
    # A vanishing learning rate: after one step the weights must still be the imported ones.
    from dataclasses import replace

    config = replace(config, optimizer=replace(config.optimizer, name="sgd", learning_rate=1e-20))
    tuned = train(config)
    weights, _ = load_network(tuned.model_dir)[0].numpy_weights()
    for name, value in base.numpy_weights()[0].items():
        np.testing.assert_allclose(weights[name], value, atol=1e-7)
    wrong = replace(config, model=replace(config.model, features=4),
                    training=replace(config.training, out_dir=str(tmp_path / "wrong")))
    with pytest.raises(InputError, match="init_checkpoint"):
        train(wrong)


@pytest.mark.skipif(not Path(str(REFERENCE_CKPT) + ".index").is_file(), reason=f"{REFERENCE_CKPT} absent")
def test_fine_tuning_imports_the_reference_checkpoint(tmp_path):
    from exaconnect.ffn.checkpoint import read_reference_weights
    from exaconnect.ffn.model import ConvStack3D
    from exaconnect.ffn.training.loop import _init_weights

    config = train_config_from_dict({
        "model": {"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8], "features": 32},
        "data": {"volumes": [{"name": "a", "image": "synthetic:0", "labels": "synthetic:0:labels"}]},
        "training": {"init_checkpoint": str(REFERENCE_CKPT), "out_dir": str(tmp_path)},
    })
    model = ConvStack3D(config.model)
    _init_weights(model, config)
    weights, biases = read_reference_weights(REFERENCE_CKPT)
    np.testing.assert_array_equal(model.weights["conv5_a"].numpy(), weights["conv5_a"])
    np.testing.assert_array_equal(model.biases["conv_lom"].numpy(), biases["conv_lom"])


def test_demo_model_is_trained_once_and_loadable(tmp_path):
    from exaconnect.ffn import load_model
    from exaconnect.ffn.training.demo import train_demo_model

    path = train_demo_model(tmp_path, seed=0, minutes=0.05, max_steps=3, progress=False)
    weights = path / "ckpt.index"
    assert weights.is_file() and (tmp_path / "demo_model.json").is_file()
    stamp = weights.stat().st_mtime_ns
    assert train_demo_model(tmp_path, seed=0, minutes=0.05, max_steps=3, progress=False) == path
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained
    predictor = load_model(path, device="cpu")
    assert predictor.model_config.fov_size == (17, 17, 17)
    assert predictor.config.inference.min_segment_size == 500
