"""An independent numpy forward pass of the convstack_3d FFN, used to check weight import.

It shares nothing with `model.py` but the weight arrays: convolution is an explicit
zero-padded im2col followed by a matrix product in float64, so an agreement with the
TensorFlow model proves that names, kernel layout and the residual wiring are right.

With `precision` 'bfloat16' or 'float16' it rounds what the reduced-precision model rounds
(each convolution's input, kernel and output; biases, residual sums and logits stay wide),
so the TF model at that precision can be checked against it far more tightly than against
float32.
"""

from __future__ import annotations

import numpy as np

from exaconnect.errors import InputError


def _rounding(precision: str):
    """x -> x rounded to `precision` (round to nearest even) and widened to float64 again."""
    if precision == "float32":
        dtype = np.float32
    elif precision == "float16":
        dtype = np.float16
    elif precision == "bfloat16":
        import ml_dtypes  # ships with TensorFlow

        dtype = ml_dtypes.bfloat16
    else:
        raise InputError(f"precision={precision!r}: expected float32, bfloat16 or float16")
    return lambda a: np.asarray(a).astype(np.float32).astype(dtype).astype(np.float64)


def conv3d_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x [z, y, x, cin], kernel [kz, ky, kx, cin, cout] -> [z, y, x, cout], 'SAME' padding.

    TensorFlow's conv3d is a cross-correlation (no kernel flip), as is this.
    """
    kz, ky, kx, cin, cout = kernel.shape
    pz, py, px = kz // 2, ky // 2, kx // 2
    padded = np.pad(x, ((pz, pz), (py, py), (px, px), (0, 0)))
    nz, ny, nx = x.shape[:3]
    columns = np.empty((nz, ny, nx, kz, ky, kx, cin), dtype=np.float64)
    for dz in range(kz):
        for dy in range(ky):
            for dx in range(kx):
                columns[:, :, :, dz, dy, dx, :] = padded[dz : dz + nz, dy : dy + ny, dx : dx + nx, :]
    out = columns.reshape(-1, kz * ky * kx * cin) @ kernel.reshape(-1, cout).astype(np.float64)
    return out.reshape(nz, ny, nx, cout) + bias.astype(np.float64)


def forward(
    image: np.ndarray,
    mask_logits: np.ndarray,
    weights: dict[str, np.ndarray],
    biases: dict[str, np.ndarray],
    depth: int,
    precision: str = "float32",
) -> np.ndarray:
    """image, mask_logits [z, y, x] -> updated mask logits [z, y, x] (float64).

    float32 is computed wholly in float64 (the reference for the TF float32 model); the other
    precisions round each convolution's input, kernel and output to that type."""
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    if precision == "float32":
        conv = conv3d_same
    else:
        rounded = _rounding(precision)

        def conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
            zero = np.zeros(kernel.shape[-1])
            return rounded(conv3d_same(rounded(x), rounded(kernel), zero)) + bias.astype(np.float64)

    net = np.stack([image, mask_logits], axis=-1).astype(np.float64)
    net = relu(conv(net, weights["conv0_a"], biases["conv0_a"]))
    net = conv(net, weights["conv0_b"], biases["conv0_b"])
    for i in range(1, depth):
        skip = net
        net = relu(conv(relu(net), weights[f"conv{i}_a"], biases[f"conv{i}_a"]))
        net = conv(net, weights[f"conv{i}_b"], biases[f"conv{i}_b"]) + skip
    update = conv(relu(net), weights["conv_lom"], biases["conv_lom"])[..., 0]
    return mask_logits.astype(np.float64) + update
