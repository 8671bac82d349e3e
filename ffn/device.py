"""Choice of the TensorFlow device the FFN runs on: CPU, NVIDIA GPU or Intel XPU.

Everything vendor-specific about accelerators lives here (and in the XPU image flavour), so
that a successor to intel-extension-for-tensorflow (ITEX, which stops at TensorFlow 2.15 and
is nearing its end of life) can replace it without touching the services.

Intel GPUs (Aurora) appear in TensorFlow as 'XPU' devices only once
intel_extension_for_tensorflow is imported; importing it is what registers the plugin, so
the probe below does that when the package is installed.

Asking explicitly for 'gpu' or 'xpu' never falls back to the CPU: when the device is absent,
`select_device` / `require_device` raise InputError naming the device, what TensorFlow sees,
whether ITEX is installed (and why it failed to load) and the affinity variables that may
hide the device. `runtime_report()` is the same information as a dict (`exaconnect doctor`).
Which tile or GPU a process sees is decided outside: ZE_AFFINITY_MASK (Intel) or
CUDA_VISIBLE_DEVICES (NVIDIA) per rank, so a worker always uses its first visible device.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
from typing import Any

from exaconnect.errors import InputError

logger = logging.getLogger(__name__)

DEVICE_KINDS = ("auto", "cpu", "gpu", "xpu")
XPU_PLUGIN = "intel_extension_for_tensorflow"
AFFINITY_VARIABLES = ("ZE_AFFINITY_MASK", "ZE_FLAT_DEVICE_HIERARCHY", "CUDA_VISIBLE_DEVICES",
                      "ONEAPI_DEVICE_SELECTOR", "ITEX_XPU_BACKEND")

_plugin_state: dict[str, Any] = {}


def _register_xpu_plugin() -> bool:
    """Imports ITEX once (that registers its XPU devices); remembers why it failed."""
    if "loaded" in _plugin_state:
        return _plugin_state["loaded"]
    if importlib.util.find_spec(XPU_PLUGIN) is None:
        _plugin_state.update(loaded=False, error=None)
        return False
    try:
        import intel_extension_for_tensorflow  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop CPU inference
        logger.warning("%s is installed but failed to load: %s", XPU_PLUGIN, exc)
        _plugin_state.update(loaded=False, error=f"{type(exc).__name__}: {exc}")
        return False
    _plugin_state.update(loaded=True, error=None)
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


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def xpu_plugin_status() -> dict[str, Any]:
    """Whether ITEX is installed, its version, and whether importing it worked."""
    _register_xpu_plugin()
    version = None
    for dist in ("intel-extension-for-tensorflow", "intel_extension_for_tensorflow"):
        version = version or _distribution_version(dist)
    return {
        "installed": importlib.util.find_spec(XPU_PLUGIN) is not None,
        "version": version,
        "lib_version": _distribution_version("intel-extension-for-tensorflow-lib"),
        "loaded": bool(_plugin_state.get("loaded")),
        "error": _plugin_state.get("error"),
    }


def _affinity() -> dict[str, str]:
    return {name: os.environ[name] for name in AFFINITY_VARIABLES if name in os.environ}


def _device_problem(kind: str, found: dict[str, list[str]]) -> str:
    import tensorflow as tf

    parts = [f"device={kind!r} requested but TensorFlow {tf.__version__} sees none",
             f"(TensorFlow sees {found})"]
    if kind == "xpu":
        status = xpu_plugin_status()
        if not status["installed"]:
            parts.append(f"; {XPU_PLUGIN} is not installed (use the XPU image, or pip install 'exaconnect[xpu]'"
                         " with TensorFlow 2.15)")
        elif status["error"]:
            parts.append(f"; {XPU_PLUGIN} {status['version']} failed to load: {status['error']}")
        else:
            parts.append(f"; {XPU_PLUGIN} {status['version']} loaded but registered no XPU "
                         "(no Level Zero GPU driver, or no /dev/dri in the container?)")
    elif kind == "gpu":
        parts.append(f"; TensorFlow built with CUDA: {tf.test.is_built_with_cuda()}")
    affinity = _affinity()
    if affinity:
        parts.append(f"; affinity variables {affinity}")
    parts.append("; run `exaconnect doctor` for details")
    return " ".join(parts).replace(" ;", ";")


def select_device(kind: str = "auto", index: int = 0) -> str:
    """Returns the TF device name to place the network on, logging the choice.

    'auto' prefers an Intel XPU, then an NVIDIA GPU, then the CPU. 'gpu' and 'xpu' raise
    InputError when absent (never a silent CPU fallback).
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
                    f"device index {index}: only {len(names)} {candidate} device(s) available ({names})"
                )
            logger.info("FFN runs on %s (requested %r; available %s)", names[index], kind, found)
            return names[index]
    raise InputError(_device_problem(kind, found))


def precision_warning(device_name: str, precision: str) -> str | None:
    """Why `precision` is a poor choice on `device_name`, or None.

    float16 is a GPU/XPU precision: on the CPU, TensorFlow 2.21's oneDNN convolves it 4-5x
    slower than float32 even on a CPU with AVX512-FP16, and TF 2.15 falls back to Eigen,
    minutes per evaluation of the FIB-25 network (measured, docs/segment.md "Reduced
    precision"). bfloat16 runs on oneDNN's AMX / AVX512-BF16 kernels where the CPU has them.
    """
    if precision == "float16" and ":CPU:" in device_name.upper():
        return (f"precision='float16' on {device_name}: TensorFlow's CPU float16 convolution is slower "
                "than float32 (4-5x with TF 2.21's oneDNN; TF 2.15 falls back to Eigen, far slower); "
                "use bfloat16 or float32 on CPUs")
    return None


def require_device(kind: str) -> str | None:
    """The worker's start-up check for `--device KIND`: the device name, or None for 'auto'/'cpu'.

    Raises InputError (the CLI exits 2) when 'gpu' or 'xpu' is asked for and absent.
    """
    if kind in ("auto", "cpu"):
        if kind == "auto":
            logger.info("device auto: %s", available_devices())
        return None
    return select_device(kind)


def _level_zero_info() -> dict[str, Any]:
    info: dict[str, Any] = {"loader": ctypes.util.find_library("ze_loader")}
    try:
        info["dri"] = sorted(os.listdir("/dev/dri"))
    except OSError:
        info["dri"] = []
    if shutil.which("sycl-ls"):
        info["sycl_ls"] = _run(["sycl-ls"])
    return info


def _nvidia_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nvidia_smi": None}
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                   "--format=csv,noheader"])
    return info


def _run(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{command[0]} failed: {exc}"
    return (out.stdout or out.stderr).strip()[:2000]


def runtime_report() -> dict[str, Any]:
    """What TensorFlow, ITEX and the drivers see: the body of `exaconnect doctor`."""
    import tensorflow as tf

    found = available_devices()
    return {
        "tensorflow": {"version": tf.__version__, "built_with_cuda": tf.test.is_built_with_cuda(),
                       "physical_devices": [d.name for d in tf.config.list_physical_devices()]},
        "devices": found,
        "auto": next((names[0] for kind in ("xpu", "gpu", "cpu") if (names := found[kind])), None),
        "itex": xpu_plugin_status(),
        "level_zero": _level_zero_info(),
        "nvidia": _nvidia_info(),
        "affinity": _affinity(),
    }
