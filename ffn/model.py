"""The convstack_3d flood-filling network as a plain `tf.Module` over `tf.nn.conv3d`.

Written without Keras so that the same code runs on TF 2.15 (the Intel XPU stack) and on
current TF. Layout follows the reference (google/ffn `convstack_3d._predict_object_mask`):

    x = concat(image, mask_logits)                       # 2 channels
    x = relu(conv0_a(x)); x = conv0_b(x)
    for i in 1..depth-1:  x = x + conv{i}_b(relu(conv{i}_a(relu(x))))
    update = conv_lom(relu(x))                           # 1x1x1, 1 channel
    logits = mask_logits + update                        # FFNModel.update_seed

Tensors are [batch, z, y, x, channel]; kernels [kz, ky, kx, in, out] exactly as stored in the
TF1 checkpoint, so imported weights need no transposition.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from exaconnect.errors import InputError

from .config import ModelConfig

_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}


def layer_names(depth: int) -> list[str]:
    """Convolution names in evaluation order, as in the reference checkpoint."""
    names = ["conv0_a", "conv0_b"]
    for i in range(1, depth):
        names += [f"conv{i}_a", f"conv{i}_b"]
    return names + ["conv_lom"]


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Kernel shape of every convolution (biases are [out])."""
    f = config.features
    shapes: dict[str, tuple[int, ...]] = {}
    for name in layer_names(config.depth):
        if name == "conv_lom":
            shapes[name] = (1, 1, 1, f, 1)
        elif name == "conv0_a":
            shapes[name] = (3, 3, 3, 2, f)
        else:
            shapes[name] = (3, 3, 3, f, f)
    return shapes


class ConvStack3D(tf.Module):
    """FFN mask-update network; call `predict` with normalized image and mask logits."""

    def __init__(self, config: ModelConfig, precision: str = "float32", seed: int = 0):
        super().__init__(name="seed_update")
        self.config = config
        if precision not in _DTYPES:
            raise InputError(f"precision={precision!r}: expected one of {tuple(_DTYPES)}")
        self.precision = precision
        self.compute_dtype = _DTYPES[precision]
        rng = np.random.default_rng(seed)
        self.weights: dict[str, tf.Variable] = {}
        self.biases: dict[str, tf.Variable] = {}
        for name, shape in layer_shapes(config).items():
            # The reference trained from truncated normals with stddev 0.01; a fresh model
            # only matters for tests, so a plain normal of that scale is enough.
            init = rng.normal(0.0, 0.01, size=shape).astype(np.float32)
            self.weights[name] = tf.Variable(init, name=f"{name}/weights")
            self.biases[name] = tf.Variable(np.zeros(shape[-1], np.float32), name=f"{name}/biases")
        fov = config.fov_zyx
        spec = tf.TensorSpec([None, *fov, 1], tf.float32)
        self.predict = tf.function(self._forward, input_signature=[spec, spec])

    def assign(self, weights: dict[str, np.ndarray], biases: dict[str, np.ndarray]) -> None:
        """Loads arrays into the variables, checking every name and shape."""
        for name, variable in self.weights.items():
            for kind, source, target in (
                ("weights", weights, variable),
                ("biases", biases, self.biases[name]),
            ):
                if name not in source:
                    raise InputError(f"checkpoint lacks {name}/{kind}")
                value = np.asarray(source[name], np.float32)
                if tuple(value.shape) != tuple(target.shape):
                    raise InputError(
                        f"{name}/{kind}: checkpoint shape {value.shape} differs from model "
                        f"shape {tuple(target.shape)}"
                    )
                target.assign(value)

    def numpy_weights(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return (
            {k: v.numpy() for k, v in self.weights.items()},
            {k: v.numpy() for k, v in self.biases.items()},
        )

    def _conv(self, x: tf.Tensor, name: str) -> tf.Tensor:
        # Reduced precision applies to the convolutions only (inputs and kernels, the
        # output as oneDNN writes it); biases, the residual stream and the mask update stay
        # float32, because rounding the residual sums to an 8-bit mantissa (bfloat16)
        # accumulates over 11 modules. Casting by hand rather than a Keras mixed-precision
        # policy keeps one code path for TF 2.15 (tf.keras 2) and current TF (Keras 3): the
        # model is a plain tf.Module, and tf.cast / tf.nn.conv3d take all three dtypes in both.
        w = tf.cast(self.weights[name], self.compute_dtype)
        y = tf.nn.conv3d(tf.cast(x, self.compute_dtype), w, strides=[1, 1, 1, 1, 1], padding="SAME")
        return tf.cast(y, tf.float32) + self.biases[name]

    def _forward(self, image: tf.Tensor, mask_logits: tf.Tensor) -> tf.Tensor:
        """image, mask_logits: [batch, z, y, x, 1] float32 -> new mask logits, same shape.

        Input and output logits are float32 whatever the precision: the network predicts a
        change of the logits it is given, and the canvas feeds each FOV's result back in over
        hundreds of overlapping steps and compares it with thresholds near 0 (logit 0.6 =
        0.405). Added in float32, voxels the network leaves alone keep their logits exactly;
        in bfloat16 every step would re-round every logit of the FOV (2.944 -> 2.938) and the
        canvas would compound those roundings from step to step.
        """
        x = tf.concat([image, mask_logits], axis=4)
        x = tf.nn.relu(self._conv(x, "conv0_a"))
        x = self._conv(x, "conv0_b")
        for i in range(1, self.config.depth):
            residual = x
            x = tf.nn.relu(self._conv(tf.nn.relu(x), f"conv{i}_a"))
            x = self._conv(x, f"conv{i}_b") + residual
        update = self._conv(tf.nn.relu(x), "conv_lom")
        return mask_logits + update
