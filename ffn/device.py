"""Choice of the TensorFlow device the FFN runs on: CPU, NVIDIA GPU or Intel XPU.

Intel GPUs (Aurora) appear in TensorFlow as 'XPU' devices only once
intel_extension_for_tensorflow is imported; importing it is what registers the plugin, so
the probe below does that when the package is installed.
"""

from __future__ import annotations

import importlib.util
import logging

from exaconnect.errors import InputError

logger = logging.getLogger(__name__)

DEVICE_KINDS = ("auto", "cpu", "gpu", "xpu")


def _register_xpu_plugin() -> bool:
    if importlib.util.find_spec("intel_extension_for_tensorflow") is None:
        return False
    try:
        import intel_extension_for_tensorflow  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop CPU inference
        logger.warning("intel_extension_for_tensorflow is installed but failed to load: %s", exc)
        return False
    return True


def available_devices() -> dict[str, list[str]]:
    """TensorFlow logical device names by kind ('cpu', 'gpu', 'xpu')."""
    import tensorflow as tf

    _register_xpu_plugin()
    found: dict[str, list[str]] = {"cpu": [], "gpu": [], "xpu": []}
    for device in tf.config.list_logical_devices():
        kind = device.device_type.lower()
        if kind in found:
            found[kind].append(device.name)
    return found


def select_device(kind: str = "auto", index: int = 0) -> str:
    """Returns the TF device name to place the network on, logging the choice.

    'auto' prefers an Intel XPU, then an NVIDIA GPU, then the CPU.
    """
    if kind not in DEVICE_KINDS:
        raise InputError(f"device={kind!r}: expected one of {DEVICE_KINDS}")
    found = available_devices()
    order = ("xpu", "gpu", "cpu") if kind == "auto" else (kind,)
    for candidate in order:
        names = found[candidate]
        if names:
            if index >= len(names):
                raise InputError(
                    f"device index {index}: only {len(names)} {candidate} device(s) available"
                )
            logger.info("FFN runs on %s (requested %r; available %s)", names[index], kind, found)
            return names[index]
    raise InputError(f"device={kind!r}: no such device available (found {found})")
