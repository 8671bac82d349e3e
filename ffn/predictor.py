"""A ready-to-run FFN: network weights placed on a device, called on batches of patches."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from .checkpoint import load_network
from .config import (
    CONFIG_FILENAME,
    FFNConfig,
    inference_options_from_dict,
    load_config,
    model_config_from_dict,
)
from .device import precision_warning, select_device
from .model import ConvStack3D

logger = logging.getLogger(__name__)


@dataclass
class Predictor:
    """Evaluates the network on [n, z, y, x] image and mask-logit patches (float32)."""

    network: ConvStack3D
    config: FFNConfig
    device: str = "/device:CPU:0"
    jit_compile: bool = False
    # Copies of this network at other precisions, made on first use (see `at_precision`).
    _variants: dict[str, "Predictor"] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fov = self.network.config.fov_zyx
        spec = tf.TensorSpec([None, *fov, 1], tf.float32)
        self._call = tf.function(
            self.network._forward, input_signature=[spec, spec], jit_compile=self.jit_compile
        )

    @property
    def model_config(self):
        return self.network.config

    @property
    def precision(self) -> str:
        """The numerics the network computes in ('float32', 'bfloat16' or 'float16')."""
        return self.network.precision

    def at_precision(self, precision: str) -> "Predictor":
        """This predictor when it already computes at `precision`, else a copy of its weights
        that does (made once per precision and kept, since tracing costs seconds)."""
        if precision == self.precision:
            return self
        if precision not in self._variants:
            self._variants[precision] = with_precision(self, precision)
        return self._variants[precision]

    def __call__(self, images: np.ndarray, mask_logits: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            out = self._call(
                tf.constant(np.asarray(images, np.float32)[..., None]),
                tf.constant(np.asarray(mask_logits, np.float32)[..., None]),
            )
        return out.numpy()[..., 0]


def load_model(
    path: str | Path,
    config_overrides: Mapping[str, Any] | None = None,
    device: str = "auto",
    jit_compile: bool = False,
) -> Predictor:
    """Loads a reference TF1 checkpoint prefix or an exaconnect checkpoint directory.

    `config_overrides` may hold `model` and/or `inference` sections (or flat inference
    option names) that replace values from the config file beside the checkpoint.
    """
    path = Path(path)
    beside = path / CONFIG_FILENAME if path.is_dir() else path.parent / CONFIG_FILENAME
    base = load_config(beside) if beside.is_file() else FFNConfig()
    if config_overrides:
        overrides = dict(config_overrides)
        model_over = overrides.pop("model", None) or {}
        inference_over = overrides.pop("inference", None) or {}
        inference_over = {**inference_over, **overrides}
        base = FFNConfig(
            model=model_config_from_dict({**dataclasses.asdict(base.model), **model_over}),
            inference=inference_options_from_dict(
                {**dataclasses.asdict(base.inference), **inference_over}
            ),
        )
    device_name = select_device(device)
    warning = precision_warning(device_name, base.inference.precision)
    if warning:
        logger.warning(warning)
    with tf.device(device_name):
        network, config = load_network(path, base)
    return Predictor(network, config, device=device_name, jit_compile=jit_compile)


def with_precision(predictor: Predictor, precision: str) -> Predictor:
    """The same weights evaluated at another precision (a new network object).

    An unknown `precision` is an InputError naming it (raised by `ConvStack3D`)."""
    warning = precision_warning(predictor.device, precision)
    if warning:
        logger.warning(warning)
    weights, biases = predictor.network.numpy_weights()
    network = ConvStack3D(predictor.network.config, precision=precision)
    network.assign(weights, biases)
    config = replace(predictor.config, inference=replace(predictor.config.inference, precision=precision))
    return Predictor(network, config, device=predictor.device, jit_compile=predictor.jit_compile)
