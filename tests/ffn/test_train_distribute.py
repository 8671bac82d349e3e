"""Data-parallel training: gradient synchronization over logical CPU devices, optimizers.

Logical devices can only be configured before TensorFlow starts, so the mirrored check runs
in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    from exaconnect.ffn.config import ModelConfig
    from exaconnect.ffn.model import ConvStack3D
    from exaconnect.ffn.training.config import OptimizerConfig, TrainingConfig
    from exaconnect.ffn.training.distribute import Optimizer, TrainStep, make_strategy, ordered_variables

    config = ModelConfig(depth=2, fov_size=(9, 9, 9), deltas=(2, 2, 2), features=4)
    opt = OptimizerConfig(name=sys.argv[1], learning_rate=0.01)
    mirrored = make_strategy(TrainingConfig(strategy="mirrored", logical_cpus=2, device="cpu"))
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    rng = np.random.default_rng(0)
    batches = [[rng.normal(size=(4, 9, 9, 9)).astype(np.float32) for _ in range(2)]
               + [(rng.random((4, 9, 9, 9)) > 0.5).astype(np.float32)] for _ in range(3)]
    out = {"replicas": mirrored.num_replicas_in_sync}
    weights = {}
    for name, strategy, per_replica in (("single", single, 4), ("mirrored", mirrored, 2)):
        with strategy.scope():
            model = ConvStack3D(config, seed=1)
            optimizer = Optimizer(opt, ordered_variables(model))
        step = TrainStep(strategy, model, optimizer, per_replica)
        losses = [step(*batch)[0] for batch in batches]
        out[name + "_losses"] = losses
        weights[name] = [v.numpy() for v in ordered_variables(model)]
        if name == "mirrored":
            # Every replica holds the same weights after the synchronized updates.
            comps = [mirrored.experimental_local_results(v) for v in ordered_variables(model)]
            out["replica_max_diff"] = max(float(np.abs(c[0].numpy() - c[1].numpy()).max()) for c in comps)
            out["devices"] = sorted({c.device for c in comps[0]})
    out["max_weight_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(weights["single"], weights["mirrored"]))
    out["max_weight_change"] = max(float(np.abs(a).max()) for a in weights["single"])
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.parametrize("optimizer", ["adam"])
def test_mirrored_gradients_match_single_device(optimizer):
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, optimizer], capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == 2 and len(result["devices"]) == 2
    # Same global batch split over two replicas = the same three updates as on one device.
    np.testing.assert_allclose(result["mirrored_losses"], result["single_losses"], rtol=1e-5)
    assert result["max_weight_diff"] < 1e-5
    assert result["replica_max_diff"] == 0.0


def test_optimizer_rules_match_closed_form():
    import tensorflow as tf

    from exaconnect.ffn.training.config import OptimizerConfig
    from exaconnect.ffn.training.distribute import Optimizer

    g = tf.constant([0.5, -2.0])
    for name, expected in (
        ("sgd", [1.0 - 0.1 * 0.5, 1.0 + 0.1 * 2.0]),
        # Adam's first step moves every weight by lr (bias-corrected m / sqrt(v) = sign(g)).
        ("adam", [1.0 - 0.1, 1.0 + 0.1]),
        ("momentum", [1.0 - 0.1 * 0.5, 1.0 + 0.1 * 2.0]),
        ("adagrad", [1.0 - 0.1 * 0.5 / np.sqrt(0.1 + 0.25), 1.0 + 0.1 * 2.0 / np.sqrt(0.1 + 4.0)]),
    ):
        v = tf.Variable([1.0, 1.0])
        opt = Optimizer(OptimizerConfig(name=name, learning_rate=0.1), [v])
        opt.apply([g], [v])
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, err_msg=name)
    # Momentum accumulates: the second identical step moves 1 + 0.9 times as far.
    v = tf.Variable([0.0])
    opt = Optimizer(OptimizerConfig(name="momentum", learning_rate=1.0, momentum=0.9), [v])
    opt.apply([tf.constant([1.0])], [v])
    opt.apply([tf.constant([1.0])], [v])
    np.testing.assert_allclose(v.numpy(), [-(1.0 + 1.9)], rtol=1e-6)
