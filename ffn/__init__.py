"""Flood-filling network (FFN) inference with the reference google/ffn semantics.

Modules, one job each: `config` (dataclasses), `model` (TF network), `numpy_forward`
(independent check of the network), `checkpoint` (reference TF1 import, our checkpoints),
`device`, `predictor` (ready-to-run network), `seeds`, `movement`, `canvas` (the
segment_all loop), `inference` (public entry points).

The names below are imported lazily so that `exaconnect.ffn.config` works without loading
TensorFlow.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "FFNConfig": "config",
    "InferenceOptions": "config",
    "ModelConfig": "config",
    "load_model": "predictor",
    "Predictor": "predictor",
    "segment_subvolume": "inference",
    "segment_subvolumes": "inference",
    "SubvolumeResult": "inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
