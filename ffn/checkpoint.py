"""Reading the reference TF1 checkpoint and saving/restoring our own.

Two kinds of checkpoint are accepted by `load_network`:

- a reference google/ffn TF1 prefix (e.g. `model.ckpt-27465036`): variables
  `seed_update/<conv>/{weights,biases}` read with `tf.train.load_checkpoint`, no TF1 graph;
- an exaconnect checkpoint written by `save_network`: a directory holding a
  `tf.train.Checkpoint` (`ckpt-N.*`) and `ffn_config.json` beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from exaconnect.errors import InputError

from .config import CONFIG_FILENAME, FFNConfig, ModelConfig, load_config, save_config
from .model import ConvStack3D, layer_names

logger = logging.getLogger(__name__)

REFERENCE_SCOPE = "seed_update"


def _is_tf1_prefix(path: Path) -> bool:
    return Path(str(path) + ".index").is_file()


def read_reference_weights(prefix: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """All `seed_update/*` kernels and biases of a google/ffn checkpoint, by layer name."""
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except Exception as exc:  # noqa: BLE001 - TF raises several types for unreadable files
        raise InputError(f"{prefix}: cannot read TF checkpoint: {exc}") from None
    weights: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}
    for name in reader.get_variable_to_shape_map():
        parts = name.split("/")
        if len(parts) != 3 or parts[0] != REFERENCE_SCOPE:
            continue
        target = {"weights": weights, "biases": biases}.get(parts[2])
        if target is not None:
            target[parts[1]] = reader.get_tensor(name)
    if not weights:
        raise InputError(f"{prefix}: no '{REFERENCE_SCOPE}/*/weights' variables; not an FFN checkpoint")
    return weights, biases


def infer_model_config(weights: dict[str, np.ndarray], fov_size=(33, 33, 33), deltas=(8, 8, 8)) -> ModelConfig:
    """Depth and width from the stored layers; FOV and deltas are not in a TF1 checkpoint."""
    residual = [n for n in weights if n.startswith("conv") and n.endswith("_a") and n != "conv0_a"]
    depth = len(residual) + 1
    features = int(weights["conv0_a"].shape[-1])
    config = ModelConfig(depth=depth, fov_size=fov_size, deltas=deltas, features=features)
    expected = set(layer_names(depth))
    if set(weights) != expected:
        raise InputError(
            f"checkpoint layers {sorted(weights)} do not form a convstack_3d of depth {depth}"
        )
    return config


def import_reference(prefix: str | Path, config: ModelConfig | None = None, precision: str = "float32") -> ConvStack3D:
    """Builds a `ConvStack3D` holding the weights of a reference TF1 checkpoint."""
    weights, biases = read_reference_weights(prefix)
    if config is None:
        config = infer_model_config(weights)
    model = ConvStack3D(config, precision=precision)
    model.assign(weights, biases)
    logger.info("imported reference FFN checkpoint %s (%s)", prefix, config)
    return model


def save_network(model: ConvStack3D, directory: str | Path, config: FFNConfig | None = None) -> Path:
    """Writes a tf.train.Checkpoint and `ffn_config.json` into `directory`; returns the prefix."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = tf.train.Checkpoint(weights=model.weights, biases=model.biases)
    prefix = checkpoint.write(str(directory / "ckpt"))
    save_config(config or FFNConfig(model=model.config), directory)
    return Path(prefix)


def _restore_ours(directory: Path, config: FFNConfig, precision: str) -> ConvStack3D:
    prefix = tf.train.latest_checkpoint(str(directory))
    if prefix is None:
        candidates = sorted(directory.glob("ckpt*.index"))
        if not candidates:
            raise InputError(f"{directory}: no tf.train.Checkpoint (ckpt*.index) found")
        prefix = str(candidates[-1])[: -len(".index")]
    model = ConvStack3D(config.model, precision=precision)
    checkpoint = tf.train.Checkpoint(weights=model.weights, biases=model.biases)
    checkpoint.read(prefix).assert_existing_objects_matched().expect_partial()
    return model


def load_network(path: str | Path, config: FFNConfig | None = None, precision: str | None = None) -> tuple[ConvStack3D, FFNConfig]:
    """Loads either kind of checkpoint; returns the network and the config that goes with it.

    A config file beside the checkpoint (our directory, or `ffn_config.json` next to a
    reference prefix) is used unless `config` is given.
    """
    path = Path(path)
    if path.is_dir():
        if config is None:
            config = load_config(path / CONFIG_FILENAME)
        model = _restore_ours(path, config, precision or config.inference.precision)
        return model, config
    if _is_tf1_prefix(path):
        beside = path.parent / CONFIG_FILENAME
        if config is None:
            config = load_config(beside) if beside.is_file() else FFNConfig()
        model = import_reference(path, config.model, precision or config.inference.precision)
        return model, config
    raise InputError(f"{path}: neither a checkpoint directory nor a TF checkpoint prefix (no {path}.index)")
