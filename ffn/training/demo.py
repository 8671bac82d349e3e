"""The small FFN that `make demo` uses: trained on the built-in synthetic sample, cached.

The model is trained on synthetic volumes generated with other seeds than the demo's own
(`seed + 1`, `seed + 2`), so the demo segments a volume the network has not seen; the
demo volume itself (`seed`) serves as the validation volume. A finished model is reused as
long as its settings match (`demo_model.json` beside it).

Training runs a fixed number of steps (`DEMO_STEPS`), not minutes, with fixed seeds and
TensorFlow op determinism, so the model and the demo's score do not depend on how fast the
machine is (bit-identical on the same machine; CPUs with other vector units may round
differently).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import train_config_from_dict

logger = logging.getLogger(__name__)

DEMO_MARKER = "demo_model.json"
# Small enough to train in minutes on two cores, large enough to see across a membrane:
# FOV 17^3 covers a synthetic neurite's width, deltas 4 keep consecutive FOVs overlapping.
DEMO_MODEL = {"depth": 4, "fov_size": [17, 17, 17], "deltas": [4, 4, 4], "features": 16}
DEMO_INFERENCE = {"min_segment_size": 500, "seed_policy": "peaks"}
# About 4 minutes of training on this repository's 2-core machine when it has the CPU to itself
# (measured 0.33 CPU-seconds per step on one thread under load; docs/train.md).
DEMO_STEPS = 1200


def demo_config(out_dir: str | Path, seed: int = 0, minutes: float = 0.0, max_steps: int = DEMO_STEPS) -> dict:
    volumes = [{"name": f"synthetic-{s}", "image": f"synthetic:{s}", "labels": f"synthetic:{s}:labels",
                "resolution": [10, 10, 10]} for s in (seed + 1, seed + 2)]
    return {
        "model": DEMO_MODEL,
        "data": {"volumes": volumes, "min_size": 1000,
                 "validation_volumes": [{"name": f"synthetic-{seed}", "image": f"synthetic:{seed}",
                                         "labels": f"synthetic:{seed}:labels", "resolution": [10, 10, 10]}]},
        "optimizer": {"name": "adam", "learning_rate": 0.001},
        "training": {"out_dir": str(out_dir), "batch_size": 4, "max_steps": max_steps, "max_minutes": minutes,
                     "seed": seed, "fov_policy": "max_pred", "summary_every_steps": 50, "validation_every_steps": 500,
                     "validation_examples": 16, "checkpoint_every_steps": 500, "checkpoint_every_seconds": 60.0,
                     # Two TensorFlow threads on every machine: the same summation order, so
                     # the same model wherever there are at least two cores and the same vector
                     # unit (oneDNN picks its kernels by it: docs/segment.md).
                     "deterministic": True, "intra_op_threads": 2, "inter_op_threads": 1},
        "inference": DEMO_INFERENCE,
    }


def train_demo_model(out_dir: str | Path, seed: int = 0, minutes: float = 0.0, max_steps: int = DEMO_STEPS,
                     progress: bool = True) -> Path:
    """Trains (or reuses) the demo FFN for `max_steps` steps; returns its model directory for
    `ffn.load_model`. `minutes` > 0 adds a time limit (then the model depends on the machine)."""
    from .loop import MODEL_DIR, train

    out_dir = Path(out_dir)
    settings = {"seed": seed, "minutes": minutes, "max_steps": max_steps, "model": DEMO_MODEL,
                "inference": DEMO_INFERENCE, "version": 3}
    marker = out_dir / DEMO_MARKER
    model_dir = out_dir / MODEL_DIR
    if marker.is_file() and (model_dir / "ffn_config.json").is_file():
        if json.loads(marker.read_text()) == settings:
            logger.info("reusing the demo FFN in %s", model_dir)
            return model_dir
    data = demo_config(out_dir, seed, minutes, max_steps)
    data["training"]["progress"] = progress
    result = train(train_config_from_dict(data, "demo model"))
    if result.step < max_steps and result.steps_run == 0:
        raise RuntimeError(f"demo FFN training in {out_dir} made no steps")
    # The marker is written last: an interrupted run resumes from train_state next time.
    marker.write_text(json.dumps(settings, indent=1))
    logger.info("demo FFN trained: %d steps, loss %.4f, validation %s", result.step, result.last_loss, result.validation)
    return result.model_dir
