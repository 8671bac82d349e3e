"""Loss weights on the rim just outside the object: the kernel, the weighted step, the config."""

from __future__ import annotations

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.ffn.training.config import train_config_from_dict
from exaconnect.ffn.training.loss_weights import boundary_weights, outside_rim


def test_outside_rim_is_the_shell_of_6_connected_steps():
    mask = np.zeros((9, 11, 13), bool)
    mask[3:6, 4:7, 5:8] = True
    rim = outside_rim(mask, 2)
    assert not (rim & mask).any()
    z, y, x = np.indices(mask.shape)
    # 6-connected steps = L1 distance to the nearest object voxel, here a box.
    dz = np.maximum(np.maximum(3 - z, z - 5), 0)
    dy = np.maximum(np.maximum(4 - y, y - 6), 0)
    dx = np.maximum(np.maximum(5 - x, x - 7), 0)
    l1 = dz + dy + dx
    np.testing.assert_array_equal(rim, (l1 >= 1) & (l1 <= 2))


def test_boundary_weights_are_none_when_uniform_and_weight_the_rim_otherwise():
    mask = np.zeros((7, 7, 7), bool)
    mask[2:5, 2:5, 2:5] = True
    assert boundary_weights(mask, 1.0, 2) is None
    weights = boundary_weights(mask, 4.0, 1)
    assert weights.dtype == np.float32
    assert set(np.unique(weights)) == {1.0, 4.0}
    assert (weights[mask] == 1.0).all() and weights[1, 3, 3] == 4.0 and weights[0, 3, 3] == 1.0
    with pytest.raises(ValueError, match="radius"):
        outside_rim(mask, 0)


def test_weighted_step_loss_is_the_weighted_mean_cross_entropy():
    import tensorflow as tf

    from exaconnect.ffn.config import ModelConfig
    from exaconnect.ffn.model import ConvStack3D
    from exaconnect.ffn.training.config import OptimizerConfig
    from exaconnect.ffn.training.distribute import Optimizer, TrainStep, ordered_variables

    config = ModelConfig(depth=1, fov_size=(7, 7, 7), deltas=(2, 2, 2), features=4)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    rng = np.random.default_rng(3)
    seeds, images = (rng.normal(size=(2, 7, 7, 7)).astype(np.float32) for _ in range(2))
    targets = (rng.random((2, 7, 7, 7)) > 0.5).astype(np.float32)
    weights = rng.choice([1.0, 5.0], size=(2, 7, 7, 7)).astype(np.float32)
    with strategy.scope():
        model = ConvStack3D(config, seed=1)
        optimizer = Optimizer(OptimizerConfig(name="sgd", learning_rate=1e-12), ordered_variables(model))
    step = TrainStep(strategy, model, optimizer, 2)
    def cross_entropy(logits):
        z = logits.astype(np.float64)
        return np.maximum(z, 0) - z * targets + np.log1p(np.exp(-np.abs(z)))

    loss_plain, logits = step(seeds, images, targets)
    assert loss_plain == pytest.approx(cross_entropy(logits).mean(), rel=1e-5)
    loss_weighted, logits = step(seeds, images, targets, weights)
    assert loss_weighted == pytest.approx((cross_entropy(logits) * weights).mean(), rel=1e-5)
    assert loss_weighted != pytest.approx(loss_plain, rel=1e-3)


@pytest.mark.parametrize("name,value", [("boundary_weight", -1.0), ("boundary_radius", 0), ("boundary_radius", 1.5)])
def test_bad_boundary_options_name_the_parameter(name, value):
    volume = {"name": "syn", "image": "synthetic:3", "labels": "synthetic:3:labels"}
    with pytest.raises(InputError, match=f"training.{name}"):
        train_config_from_dict({"data": {"volumes": [volume]}, "training": {name: value}})
