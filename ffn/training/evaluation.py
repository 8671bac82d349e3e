"""Checkpoint evaluation by segmentation quality, and choosing a run's model by it.

A voxel-level validation F1 rises while a network learns to merge through faint membranes;
what a user needs is the checkpoint that *segments* best. So every evaluation point of a
run (`evaluation.every_steps`, or every kept checkpoint of a finished run) segments the
config's `evaluation.boxes` with the inference options the user will run, and records VI
(split, merge), adapted Rand error and the unsegmented fraction against the labels (label 0
of the segmentation counted as one segment, as `exaconnect evaluate` does).

Layout inside a run folder::

    milestones/ckpt-N.*            weights kept for evaluation (never rotated away)
    milestones/milestones.jsonl    why each was kept, training CPU and wall seconds
    evaluations/step-0000N.json    one record per evaluated checkpoint
    evaluation.png, evaluation.md, evaluation.json   `summarize_run` output
    model/ (+ selection.json)      the chosen checkpoint, exported; last_model/ then holds the latest

`evaluate_checkpoint` is what a queue task runs (services/train.py `CheckpointEvalTask`);
it is idempotent (a finished record is kept unless `force`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from exaconnect.errors import InputError

from .config import EVAL_METRICS, TrainConfig, load_train_config

logger = logging.getLogger(__name__)

MILESTONES_DIR = "milestones"
EVALUATIONS_DIR = "evaluations"
LAST_MODEL_DIR = "last_model"
SELECTION_FILENAME = "selection.json"
SUMMARY_STEM = "evaluation"
_CKPT = re.compile(r"^ckpt-(\d+)\.index$")


def run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise InputError(f"{run_dir}: not a training run folder (no config.yaml)")
    return load_train_config(path)


def list_checkpoints(run_dir: str | Path) -> dict[int, str]:
    """Step -> checkpoint prefix, for every checkpoint of the run still on disk (kept
    milestones first, then train_state/)."""
    run_dir = Path(run_dir)
    found: dict[int, str] = {}
    for folder in ("train_state", MILESTONES_DIR):  # milestones win: they are never rotated away
        directory = run_dir / folder
        if directory.is_dir():
            for path in directory.iterdir():
                match = _CKPT.match(path.name)
                if match:
                    found[int(match.group(1))] = str(path)[: -len(".index")]
    return dict(sorted(found.items()))


def milestone_records(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    path = Path(run_dir) / MILESTONES_DIR / "milestones.jsonl"
    records: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records.setdefault(int(record["step"]), record)
    return records


def evaluation_path(run_dir: str | Path, step: int, suite: str = EVALUATIONS_DIR) -> Path:
    return Path(run_dir) / suite / f"step-{step:08d}.json"


def read_evaluations(run_dir: str | Path, suite: str = EVALUATIONS_DIR) -> list[dict[str, Any]]:
    directory = Path(run_dir) / suite
    if not directory.is_dir():
        return []
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("step-*.json"))]
    return sorted(records, key=lambda r: r["step"])


def evaluation_options(config: TrainConfig):
    """The FFNConfig evaluation segments with: the exported model's options plus overrides."""
    import dataclasses

    from ..config import FFNConfig, inference_options_from_dict
    from .config import model_config_of

    exported = model_config_of(config)
    options = {**dataclasses.asdict(exported.inference), **config.evaluation.inference}
    return FFNConfig(model=config.model, inference=inference_options_from_dict(options, "evaluation.inference"))


def load_checkpoint_predictor(prefix: str, config: TrainConfig, device: str = "cpu"):
    """A Predictor with the weights of one training checkpoint (train_state or milestone)."""
    from .tf_runtime import quiet_tensorflow

    quiet_tensorflow()
    import tensorflow as tf

    from ..device import select_device
    from ..model import ConvStack3D
    from ..predictor import Predictor

    ffn_config = evaluation_options(config)
    device_name = select_device(device)
    with tf.device(device_name):
        model = ConvStack3D(config.model, precision=ffn_config.inference.precision)
        status = tf.train.Checkpoint(weights=model.weights, biases=model.biases).read(prefix)
        status.expect_partial()
        try:
            status.assert_existing_objects_matched()
        except AssertionError as exc:
            raise InputError(f"{prefix}: does not hold the weights of model {config.model}: {exc}") from None
    return Predictor(model, ffn_config, device=device_name)


def score(segmentation: np.ndarray, groundtruth: np.ndarray) -> dict[str, Any]:
    from exaconnect.precomputed.evaluate import segmentation_metrics

    metrics = segmentation_metrics(segmentation, groundtruth)
    return {
        "vi": metrics["vi"], "vi_split": metrics["vi_split"], "vi_merge": metrics["vi_merge"],
        "adapted_rand_error": metrics["adapted_rand_error"],
        "unsegmented_fraction": float(np.mean(segmentation == 0)),
        "segments": metrics["segments"], "merged_objects": metrics["merged_objects"],
        "split_objects": metrics["split_objects"],
    }


def _combine(boxes: list[dict[str, Any]]) -> dict[str, float]:
    """Voxel-weighted mean of each metric over the boxes."""
    weights = np.array([b["voxels"] for b in boxes], dtype=np.float64)
    out = {}
    for key in ("vi", "vi_split", "vi_merge", "adapted_rand_error", "unsegmented_fraction"):
        out[key] = float(np.average([b[key] for b in boxes], weights=weights))
    return out


def evaluate_checkpoint(run_dir: str | Path, step: int, prefix: str | None = None, force: bool = False,
                        device: str = "cpu", predictor=None, boxes=None, suite: str = EVALUATIONS_DIR,
                        keep_segmentation: bool = False) -> dict[str, Any]:
    """Segments every evaluation box with checkpoint `step` of the run; writes and returns
    the record (<suite>/step-N.json). `boxes` (VolumeSource list) replaces the config's boxes,
    e.g. a test volume kept apart from selection, recorded under another `suite` folder."""
    from ..fill import fill_unsegmented
    from ..inference import segment_subvolume
    from .data import read_volume

    run_dir = Path(run_dir)
    out = evaluation_path(run_dir, step, suite)
    if out.is_file() and not force:
        return json.loads(out.read_text())
    config = run_config(run_dir)
    ev = config.evaluation
    if boxes is not None:
        ev = replace(ev, boxes=tuple(boxes))
    if not ev.boxes:
        raise InputError(f"{run_dir}/config.yaml: evaluation.boxes is empty; name the boxes to segment")
    if predictor is None:
        if prefix is None:
            prefix = list_checkpoints(run_dir).get(step)
            if prefix is None:
                raise InputError(f"{run_dir}: no checkpoint at step {step} (have {sorted(list_checkpoints(run_dir))})")
        predictor = load_checkpoint_predictor(prefix, config, device)
    started = time.perf_counter()
    cpu0 = time.process_time()
    rows: list[dict[str, Any]] = []
    for source in ev.boxes:
        volume = read_volume(source)
        t0 = time.perf_counter()
        result = segment_subvolume(volume.image, predictor)
        labels = result.labels
        row: dict[str, Any] = {"name": source.name, "bbox": list(source.bbox) if source.bbox else None,
                               "voxels": int(labels.size)}
        if ev.fill_unsegmented:
            row["unsegmented_before_fill"] = float(np.mean(labels == 0))
            labels = fill_unsegmented(volume.image, labels, sigma=ev.fill_sigma)
        row.update(score(labels, volume.labels))
        row.update(network_evaluations=int(result.counters.get("network-evaluations", 0)),
                   seconds=round(time.perf_counter() - t0, 2))
        if keep_segmentation:
            seg_path = out.parent / f"step-{step:08d}-{source.name}.npz"
            seg_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(seg_path, ffn=result.labels, scored=labels)
            row["segmentation"] = str(seg_path)
        rows.append(row)
    record = {"step": int(step), "checkpoint": prefix, **_combine(rows), "boxes": rows,
              "inference": dict(ev.inference), "fill_unsegmented": ev.fill_unsegmented,
              "seconds": round(time.perf_counter() - started, 2),
              "cpu_seconds": round(time.process_time() - cpu0, 2)}
    milestone = milestone_records(run_dir).get(int(step))
    if milestone:
        record["training_cpu_seconds"] = milestone.get("cpu_seconds")
        record["training_wall_seconds"] = milestone.get("wall_seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)
    logger.info("step %d: VI %.3f (split %.3f / merge %.3f), ARE %.3f, unsegmented %.1f %%", step, record["vi"],
                record["vi_split"], record["vi_merge"], record["adapted_rand_error"],
                100 * record["unsegmented_fraction"])
    return record


def pending_steps(run_dir: str | Path, every_steps: int | None = None, steps: list[int] | None = None) -> list[int]:
    """Checkpoint steps of the run without an evaluation record (optionally only multiples of
    `every_steps`, or only `steps`)."""
    have = list_checkpoints(run_dir)
    chosen = [s for s in have if (not every_steps or s % every_steps == 0) and (steps is None or s in steps)]
    return [s for s in chosen if not evaluation_path(run_dir, s).is_file()]


# --- choosing and exporting ----------------------------------------------------------------

def best_record(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """Lowest `metric`; ties go to the later checkpoint (more training for the same score)."""
    if metric not in EVAL_METRICS:
        raise InputError(f"--metric {metric!r}: expected one of {EVAL_METRICS}")
    valid = [r for r in records if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])]
    if not valid:
        return None
    return min(valid, key=lambda r: (r[metric], -r["step"]))


def export_checkpoint(run_dir: str | Path, record: dict[str, Any], metric: str) -> Path:
    """Writes the chosen checkpoint as the run's model (`model/`, loadable by
    `exaconnect segment --model`); the training loop's latest weights move to `last_model/`."""
    from ..checkpoint import save_network

    run_dir = Path(run_dir)
    config = run_config(run_dir)
    prefix = list_checkpoints(run_dir).get(int(record["step"])) or record.get("checkpoint")
    if not prefix or not Path(str(prefix) + ".index").is_file():
        raise InputError(f"{run_dir}: the checkpoint of step {record['step']} is gone; cannot export it")
    predictor = load_checkpoint_predictor(prefix, config)
    model_dir = run_dir / "model"
    if model_dir.is_dir() and not (model_dir / SELECTION_FILENAME).is_file():
        last = run_dir / LAST_MODEL_DIR
        if last.exists():
            shutil.rmtree(last)
        shutil.copytree(model_dir, last)
    staging = run_dir / "model.selecting"
    if staging.exists():
        shutil.rmtree(staging)
    # The model keeps the run's inference options (not the evaluation-only overrides).
    from .config import model_config_of

    save_network(predictor.network, staging, model_config_of(config))
    (staging / SELECTION_FILENAME).write_text(json.dumps(
        {"step": int(record["step"]), "metric": metric, "value": record[metric], "checkpoint": str(prefix),
         "scores": {k: record.get(k) for k in ("vi", "vi_split", "vi_merge", "adapted_rand_error",
                                               "unsegmented_fraction")}}, indent=1))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staging.replace(model_dir)
    return model_dir


def _nearest(records: list[dict[str, Any]], step: int, key: str, before: bool = False) -> float | None:
    candidates = [r for r in records if key in r and (not before or r["step"] <= step)]
    if not candidates:
        return None
    return float(min(candidates, key=lambda r: abs(r["step"] - step))[key])


def _window_mean(records: list[dict[str, Any]], step: int, key: str, count: int = 10) -> float | None:
    """Mean of `key` over the last `count` records at or before `step` (a smoothed loss)."""
    values = [r[key] for r in records if key in r and r["step"] <= step][-count:]
    return float(np.mean(values)) if values else None


def summary_rows(run_dir: str | Path, metric: str = "adapted_rand_error",
                 extra_suites: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], dict | None]:
    """One row per evaluated checkpoint with the training loss (mean of the last 10 records)
    and the latest validation F1 at or before it
    (and `<suite>_vi`, `<suite>_adapted_rand_error` of other record folders, shown only)."""
    from .monitor import read_metrics

    records = read_evaluations(run_dir)
    metrics = read_metrics(run_dir)
    train = [r for r in metrics if r.get("kind") == "train"]
    val = [r for r in metrics if r.get("kind") == "validation"]
    best = best_record(records, metric)
    rows = []
    for r in records:
        rows.append({
            "step": r["step"], "chosen": best is not None and r["step"] == best["step"],
            "loss": _window_mean(train, r["step"], "loss"), "f1": _nearest(val, r["step"], "f1", before=True),
            "vi": r["vi"], "vi_split": r["vi_split"], "vi_merge": r["vi_merge"],
            "adapted_rand_error": r["adapted_rand_error"], "unsegmented_fraction": r["unsegmented_fraction"],
            "training_cpu_minutes": (r["training_cpu_seconds"] / 60.0) if r.get("training_cpu_seconds") else
            (_nearest(train, r["step"], "cpu_seconds", before=True) or 0.0) / 60.0 or None,
        })
    for suite in extra_suites:
        others = {r["step"]: r for r in read_evaluations(run_dir, suite)}
        for row in rows:
            other = others.get(row["step"])
            for key in ("vi", "vi_split", "vi_merge", "adapted_rand_error", "unsegmented_fraction"):
                row[f"{suite}_{key}"] = other[key] if other else None
    return rows, best


def plot_run(run_dir: str | Path, rows: list[dict[str, Any]], best: dict | None, metric: str,
             extra_suites: tuple[str, ...] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .monitor import read_metrics

    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    train = [r for r in metrics if r.get("kind") == "train"]
    val = [r for r in metrics if r.get("kind") == "validation" and "f1" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    (ax_loss, ax_f1), (ax_vi, ax_are) = axes
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train])
        ax_loss.plot(steps, loss, lw=0.5, alpha=0.4, color="tab:blue")
        if len(loss) >= 20:
            k = max(len(loss) // 40, 5)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax_loss.plot(steps[k - 1:], smooth, lw=1.5, color="tab:blue")
    ax_loss.set_ylabel("training loss (sigmoid CE)")
    ax_loss.set_title("training loss")
    if val:
        ax_f1.plot([r["step"] for r in val], [r["f1"] for r in val], "o-", lw=1, color="tab:green")
    ax_f1.set_ylabel("validation F1 (FOV masks)")
    ax_f1.set_title("voxel-level validation F1")
    if rows:
        steps = [r["step"] for r in rows]
        ax_vi.plot(steps, [r["vi"] for r in rows], "o-", label="VI", color="k")
        ax_vi.plot(steps, [r["vi_split"] for r in rows], "s--", label="split", color="tab:orange", ms=4)
        ax_vi.plot(steps, [r["vi_merge"] for r in rows], "^--", label="merge", color="tab:red", ms=4)
        ax_vi.legend(fontsize=8)
        ax_are.plot(steps, [r["adapted_rand_error"] for r in rows], "o-", color="tab:purple", label="adapted Rand error")
        ax_are.plot(steps, [r["unsegmented_fraction"] for r in rows], "x:", color="gray", label="unsegmented fraction")
        for suite in extra_suites:
            pts = [(r["step"], r[f"{suite}_vi"], r[f"{suite}_adapted_rand_error"]) for r in rows
                   if r.get(f"{suite}_vi") is not None]
            if pts:
                ax_vi.plot([p[0] for p in pts], [p[1] for p in pts], "o:", color="tab:blue", mfc="none",
                           label=f"VI, {suite} (not used to choose)")
                ax_are.plot([p[0] for p in pts], [p[2] for p in pts], "o:", color="tab:blue", mfc="none",
                            label=f"ARE, {suite} (not used to choose)")
        ax_vi.legend(fontsize=8)
        ax_are.legend(fontsize=8)
    ax_vi.set_ylabel("bits")
    ax_vi.set_title("VI on the evaluation boxes (lower is better)")
    ax_are.set_title("adapted Rand error (lower is better)")
    if best is not None:
        for ax in axes.ravel():
            ax.axvline(best["step"], color="tab:cyan", lw=1.5, ls="-", alpha=0.8)
        target = ax_are if metric == "adapted_rand_error" else ax_vi
        target.plot([best["step"]], [best[metric]], marker="*", ms=18, color="tab:cyan", mec="k", zorder=5,
                    label=f"chosen: step {best['step']}")
        target.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{run_dir.name}: checkpoint evaluation (chosen by {metric})")
    fig.tight_layout()
    path = run_dir / f"{SUMMARY_STEM}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "**chosen**" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summarize_run(run_dir: str | Path, metric: str = "adapted_rand_error", export: bool = True,
                  extra_suites: tuple[str, ...] = ()) -> dict[str, Any]:
    """Table (evaluation.md/.json) and curves (evaluation.png) of a run's checkpoint
    evaluations; exports the best checkpoint by `metric` as the run's model. `extra_suites`
    (record folders written with `evaluate_checkpoint(suite=...)`, e.g. a test volume) are
    shown beside the curves and never take part in the choice."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found")
    extra_suites = tuple(x for x in extra_suites if (run_dir / x).is_dir())
    rows, best = summary_rows(run_dir, metric, extra_suites)
    columns = ["step", "chosen", "training_cpu_minutes", "loss", "f1", "vi", "vi_split", "vi_merge",
               "adapted_rand_error", "unsegmented_fraction"]
    for suite in extra_suites:
        columns += [f"{suite}_vi", f"{suite}_adapted_rand_error", f"{suite}_unsegmented_fraction"]
    lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    for row in rows:
        lines.append(f"| {' | '.join(_cell(row.get(c)) for c in columns)} |")
    table = run_dir / f"{SUMMARY_STEM}.md"
    table.write_text("\n".join(lines) + "\n")
    plot = plot_run(run_dir, rows, best, metric, extra_suites)
    summary: dict[str, Any] = {"run": str(run_dir), "metric": metric, "rows": rows, "table": str(table),
                               "plot": str(plot), "chosen": None, "model": None}
    if best is not None:
        summary["chosen"] = {k: best.get(k) for k in ("step", "vi", "vi_split", "vi_merge", "adapted_rand_error",
                                                      "unsegmented_fraction")}
        if rows:
            summary["last"] = {k: rows[-1][k] for k in ("step", "vi", "adapted_rand_error")}
        if export:
            summary["model"] = str(export_checkpoint(run_dir, best, metric))
    (run_dir / f"{SUMMARY_STEM}.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_score(run_dir: str | Path, metric: str) -> tuple[float, int | None]:
    """(best value of `metric`, its step) over the run's evaluations; (nan, None) if none."""
    best = best_record(read_evaluations(run_dir), metric)
    if best is None:
        return float("nan"), None
    return float(best[metric]), int(best["step"])


