"""The small FFN that `make demo` uses: kept in the repository (`ffn/demo_model/`), and how it is made.

`make demo` segments with the committed model, so it trains nothing and every CPU runs the same
weights (only the rounding of inference differs between vector units). It was made by one
command, on synthetic volumes other than the demo's own (the demo volume is seed 0):

    .venv/bin/python bench/build_demo_model.py build --work runs/demo-model

1. the selection volumes: synthetic seeds `SELECTION_SEEDS`, misaligned and aligned by the demo
   pipeline itself (configs/demo.yaml without its segment section), so the checkpoint is chosen
   on images like the one the demo segments (residual misalignment, a blank section);
2. training on synthetic seeds `TRAINING_SEEDS` in `PHASES` (a fixed number of steps at each
   learning rate, fixed seeds, TensorFlow op determinism, two threads);
3. every checkpoint from the start of the last phase (`SELECTION_EVERY_STEPS`) segments the selection volumes
   with `DEMO_INFERENCE`; the one with the lowest mean VI is exported;
4. its weights, `ffn_config.json`, the training config and `demo_model.json` (SHA-256 of every
   file, the selection table, the times) are written into `ffn/demo_model/`.

`segment.demo_model_steps: N` in a pipeline file still trains a demo model in the run instead
(`train_demo_model`: N steps at the first phase's learning rate, cached beside the output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from exaconnect.errors import InputError

from .config import train_config_from_dict

logger = logging.getLogger(__name__)

DEMO_MARKER = "demo_model.json"
# Small enough to train in minutes on two cores, large enough to see across a membrane:
# FOV 17^3 covers a synthetic neurite's width, deltas 4 keep consecutive FOVs overlapping.
DEMO_MODEL = {"depth": 4, "fov_size": [17, 17, 17], "deltas": [4, 4, 4], "features": 16}
DEMO_INFERENCE = {"min_segment_size": 500, "seed_policy": "peaks"}
TRAINING_SEEDS = (1, 2)
SELECTION_SEEDS = (3, 4, 5)
# (train up to this step, at this learning rate): Adam at 1e-3 still jumps between checkpoints
# (mean VI on the selection volumes 2.02-2.63 over steps 20,000-30,000); a lower rate settles it.
PHASES = ((30000, 0.001), (40000, 0.0003))
SELECTION_EVERY_STEPS = 2000
# Steps of a demo model trained inside a run (`segment.demo_model_steps` unset there means the
# committed model; this is the default for `train_demo_model`).
DEMO_STEPS = PHASES[-1][0]
COMMITTED_MODEL_DIR = Path(__file__).resolve().parents[1] / "demo_model"
TRAINING_CONFIG_FILE = "train.yaml"


def demo_config(out_dir: str | Path, seed: int = 0, minutes: float = 0.0, max_steps: int = DEMO_STEPS,
                learning_rate: float = PHASES[0][1]) -> dict:
    """The demo model's training config. Synthetic volumes `seed + TRAINING_SEEDS` are trained
    on, `seed + SELECTION_SEEDS[0]` monitors the FOV-level F1; `seed` itself (the demo volume)
    is never seen."""
    def volume(s: int) -> dict:
        return {"name": f"synthetic-{s}", "image": f"synthetic:{s}", "labels": f"synthetic:{s}:labels",
                "resolution": [10, 10, 10]}

    return {
        "model": DEMO_MODEL,
        "data": {"volumes": [volume(seed + s) for s in TRAINING_SEEDS], "min_size": 1000,
                 "validation_volumes": [volume(seed + SELECTION_SEEDS[0])]},
        "optimizer": {"name": "adam", "learning_rate": learning_rate},
        "training": {"out_dir": str(out_dir), "batch_size": 4, "max_steps": max_steps, "max_minutes": minutes,
                     "seed": seed, "fov_policy": "max_pred", "summary_every_steps": 50,
                     "validation_every_steps": SELECTION_EVERY_STEPS, "validation_examples": 16,
                     "checkpoint_every_steps": 500, "checkpoint_every_seconds": 60.0, "keep_checkpoints": 3,
                     "checkpoint_at_steps": list(range(SELECTION_EVERY_STEPS, max_steps + 1, SELECTION_EVERY_STEPS)),
                     "progress_every_steps": 1000,
                     # Two TensorFlow threads on every machine: the same summation order, so
                     # the same model wherever there are at least two cores and the same vector
                     # unit (oneDNN picks its kernels by it: docs/segment.md).
                     "deterministic": True, "intra_op_threads": 2, "inter_op_threads": 1},
        "inference": DEMO_INFERENCE,
    }


def train_demo_model(out_dir: str | Path, seed: int = 0, minutes: float = 0.0, max_steps: int = DEMO_STEPS,
                     progress: bool = True) -> Path:
    """Trains (or reuses) a demo FFN for `max_steps` steps at the first phase's learning rate;
    returns its model directory for `ffn.load_model`. `minutes` > 0 adds a time limit (then the
    model depends on the machine)."""
    from .loop import MODEL_DIR, train

    out_dir = Path(out_dir)
    settings = {"seed": seed, "minutes": minutes, "max_steps": max_steps, "model": DEMO_MODEL,
                "inference": DEMO_INFERENCE, "version": 4}
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


# --- the committed model -------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def committed_demo_model(directory: str | Path = COMMITTED_MODEL_DIR) -> tuple[Path, str]:
    """The committed demo model's folder and its digest (SHA-256 over the files' checksums),
    after checking every file against `demo_model.json`."""
    directory = Path(directory)
    manifest_path = directory / DEMO_MARKER
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: the demo model's manifest is missing; expected the committed demo model "
                         "(rebuild it with `python bench/build_demo_model.py build --work DIR`)")
    files = json.loads(manifest_path.read_text()).get("files") or {}
    if "ffn_config.json" not in files:
        raise InputError(f"{manifest_path}: lists no ffn_config.json; expected the model's files with their SHA-256")
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise InputError(f"{path}: missing; the demo model's manifest lists it")
        if _sha256(path) != expected:
            raise InputError(f"{path}: SHA-256 {_sha256(path)[:12]}... differs from {expected[:12]}... in {manifest_path}; "
                             "the committed demo model was changed without rebuilding it")
    digest = hashlib.sha256("".join(f"{n}={h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    return directory, digest


def install_demo_model(dest_root: str | Path, directory: str | Path = COMMITTED_MODEL_DIR) -> Path:
    """A verified copy of the committed demo model in `dest_root/demo-model-DIGEST12` (made once):
    inside a run's output every worker can read it, and its path, which the segment stages'
    fingerprints hold, changes whenever the model does."""
    source, digest = committed_demo_model(directory)
    dest = Path(dest_root) / f"demo-model-{digest[:12]}"
    if (dest / DEMO_MARKER).is_file():
        try:
            if committed_demo_model(dest)[1] == digest:
                return dest
        except InputError:
            pass
    staging = dest.with_name(dest.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__"))
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    return dest


# --- making it ----------------------------------------------------------------------------------

def build_demo_model(work_dir: str | Path, boxes: list, dest: str | Path = COMMITTED_MODEL_DIR,
                     progress: bool = True) -> dict:
    """Trains, chooses (on `boxes`: VolumeSources of the selection volumes, which
    bench/build_demo_model.py makes with the demo pipeline) and writes the committed demo model
    (module docstring); returns its manifest."""
    from .evaluation import best_record, evaluate_checkpoint, export_checkpoint, list_checkpoints
    from .loop import train

    work_dir, dest = Path(work_dir).resolve(), Path(dest)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run_dir = work_dir / "run"
    phases = []
    for max_steps, learning_rate in PHASES:
        data = demo_config(run_dir, 0, 0.0, PHASES[-1][0], learning_rate)
        data["training"]["max_steps"] = max_steps
        data["training"]["progress"] = progress
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = train(train_config_from_dict(data, "demo model"))
        phases.append({"to_step": max_steps, "learning_rate": learning_rate, "steps_run": result.steps_run,
                       "wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)})
    first = PHASES[-2][0] if len(PHASES) > 1 else 0
    steps = [s for s in list_checkpoints(run_dir) if s >= first and s % SELECTION_EVERY_STEPS == 0]
    t0 = time.perf_counter()
    records = [evaluate_checkpoint(run_dir, s, boxes=boxes) for s in steps]
    chosen = best_record(records, "vi")
    if chosen is None:
        raise RuntimeError(f"{run_dir}: no checkpoint of steps {steps} could be scored")
    export_checkpoint(run_dir, chosen, "vi")
    return write_committed_model(run_dir, chosen, records, phases, dest,
                                 selection_seconds=time.perf_counter() - t0, total_seconds=time.perf_counter() - started)


def write_committed_model(run_dir: Path, chosen: dict, records: list[dict], phases: list[dict], dest: Path,
                          **times: float) -> dict:
    """The exported model of `run_dir` (model/), its training config and `demo_model.json`
    (the selection table, `times`, the SHA-256 of every file) written into `dest`."""
    staging = dest.with_name(dest.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(run_dir / "model", staging, ignore=shutil.ignore_patterns("selection.json"))
    (staging / TRAINING_CONFIG_FILE).write_text((run_dir / "config.yaml").read_text())
    files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    manifest = {
        "what": "the demo FFN (ffn/training/demo.py); files checked by SHA-256 before every demo run",
        "command": "python bench/build_demo_model.py build --work WORK_DIR",
        "training_seeds": list(TRAINING_SEEDS), "selection_seeds": list(SELECTION_SEEDS),
        "phases": phases, "chosen_step": int(chosen["step"]), "metric": "vi (mean over the selection volumes)",
        "selection": [{"step": r["step"], "vi": round(r["vi"], 4), "vi_split": round(r["vi_split"], 4),
                       "vi_merge": round(r["vi_merge"], 4), "adapted_rand_error": round(r["adapted_rand_error"], 4),
                       "unsegmented_fraction": round(r["unsegmented_fraction"], 4)} for r in records],
        **{k: round(v, 1) for k, v in times.items()},
        "files": files,
    }
    (staging / DEMO_MARKER).write_text(json.dumps(manifest, indent=1) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    committed_demo_model(dest)
    return manifest
