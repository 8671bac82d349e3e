"""Hyperparameter scans: one training run per point of a grid, then a ranked summary.

A sweep file names a base training config and a grid of dotted keys::

    base: configs/train_synthetic.yaml     # relative to the sweep file
    out_dir: runs/sweep
    metric: adapted_rand_error             # rank by: f1 (validation FOV F1, higher is better) or
                                           # adapted_rand_error | vi | vi_merge | vi_split of each
                                           # run's best evaluated checkpoint (lower is better)
    grid:
      optimizer.learning_rate: [0.001, 0.0003]
      training.batch_size: [2, 4]
      model.depth: [3, 4]
      optimizer.name: [adam, sgd]

Every combination becomes a complete, validated training config with its own out_dir
(`<out_dir>/<name>`); `services/train.py` turns them into queue tasks, each of which writes
`result.json` beside its metrics. `summarize_sweep` ranks the finished runs and writes
`summary.md`, `summary.json` and `sweep.png`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from exaconnect.errors import InputError

from .config import merge_overrides, train_config_from_dict

RESULT_FILENAME = "result.json"
SECTIONS = ("model", "data", "augment", "optimizer", "training", "inference", "evaluation")
# Validation F1 of FOV masks (higher is better) or a segmentation metric of the run's best
# evaluated checkpoint (ffn.training.evaluation; lower is better).
HIGHER_IS_BETTER = ("f1", "precision", "recall", "accuracy")


@dataclass(frozen=True)
class SweepPoint:
    name: str
    overrides: dict[str, dict[str, Any]]
    config: dict[str, Any]  # the full training config as plain data (YAML/JSON-ready)


@dataclass(frozen=True)
class Sweep:
    out_dir: str
    metric: str
    points: tuple[SweepPoint, ...]


def _short(key: str) -> str:
    aliases = {"optimizer.learning_rate": "lr", "training.batch_size": "bs", "model.depth": "depth",
               "optimizer.name": "opt", "model.features": "feat"}
    return aliases.get(key, key.split(".")[-1])


def _point_name(values: Mapping[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{_short(key)}-{text}")
    return "_".join(parts).replace("/", "-") or "base"


def load_sweep(path: str | Path) -> Sweep:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: sweep file not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: cannot parse YAML: {exc}") from None
    unknown = sorted(set(spec) - {"base", "out_dir", "metric", "grid"})
    if unknown:
        raise InputError(f"{path}: unknown sweep key(s) {unknown}; valid keys are base, out_dir, metric, grid")
    if "base" not in spec:
        raise InputError(f"{path}: 'base' (a training config file, or an inline config) is required")
    base = spec["base"]
    if isinstance(base, str):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise InputError(f"{path}: base config {base_path} not found")
        base = yaml.safe_load(base_path.read_text()) or {}
    return build_sweep(base, spec.get("grid") or {}, spec.get("out_dir", "runs/sweep"), spec.get("metric", "f1"),
                       str(path))


def build_sweep(base: Mapping[str, Any], grid: Mapping[str, Any], out_dir: str, metric: str = "f1",
                source: str = "sweep") -> Sweep:
    if not isinstance(grid, Mapping):
        raise InputError(f"{source}: grid: expected a mapping of dotted keys to lists of values")
    keys = list(grid)
    for key in keys:
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise InputError(f"{source}: grid key {key!r}: expected <section>.<option> with section in {SECTIONS}")
        if not isinstance(grid[key], list) or not grid[key]:
            raise InputError(f"{source}: grid key {key!r}: expected a non-empty list of values")
    points = []
    from .config import EVAL_METRICS

    if metric not in HIGHER_IS_BETTER + EVAL_METRICS:
        raise InputError(f"{source}: metric {metric!r}: expected one of {HIGHER_IS_BETTER + EVAL_METRICS}")
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = _point_name(values)
        overrides: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            section, _, option = key.partition(".")
            overrides.setdefault(section, {})[option] = value
        overrides.setdefault("training", {})["out_dir"] = str(Path(out_dir) / name)
        data = merge_overrides(base, overrides)
        # Validate every point now, not when a worker picks it up an hour later.
        train_config_from_dict(data, f"{source} point {name}")
        points.append(SweepPoint(name, overrides, data))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise InputError(f"{source}: grid values give duplicate run names {names}")
    return Sweep(out_dir, metric, tuple(points))


def write_result(out_dir: str | Path, result, config_point: str) -> Path:
    """The per-run metrics a sweep summary reads (written by the training task)."""
    record = {
        "name": config_point,
        "step": result.step,
        "steps_run": result.steps_run,
        "seconds": round(result.seconds, 2),
        "examples_per_second": round(result.examples_per_second, 3),
        "last_loss": result.last_loss,
        "validation": result.validation,
        "model_dir": str(result.model_dir),
    }
    path = Path(out_dir) / RESULT_FILENAME
    path.write_text(json.dumps(record, indent=1))
    return path


def summarize_sweep(sweep: Sweep) -> list[dict[str, Any]]:
    """Ranks finished points by the sweep's metric (then by final training loss): the
    validation F1 (higher is better) or, for a segmentation metric, the value of the run's
    best evaluated checkpoint (lower is better; the same choice `train summary` exports)."""
    from .evaluation import run_score
    from .monitor import read_metrics

    higher = sweep.metric in HIGHER_IS_BETTER

    rows = []
    for point in sweep.points:
        run_dir = Path(point.config["training"]["out_dir"])
        result_path = run_dir / RESULT_FILENAME
        row: dict[str, Any] = {"name": point.name, "status": "pending"}
        for section, values in point.overrides.items():
            for key, value in values.items():
                if key != "out_dir":
                    row[f"{section}.{key}"] = value
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            row.update(status="done", step=result["step"], last_loss=result["last_loss"],
                       examples_per_second=result["examples_per_second"])
            if higher:
                row["metric"] = result.get("validation", {}).get(sweep.metric, float("nan"))
            else:
                row["metric"], row["chosen_step"] = run_score(run_dir, sweep.metric)
        elif read_metrics(run_dir):
            row["status"] = "running"
        rows.append(row)

    def key(row):
        metric = row.get("metric", float("nan"))
        loss = row.get("last_loss", float("inf"))
        if math.isnan(metric):
            return (row["status"] != "done", math.inf, loss)
        return (row["status"] != "done", -metric if higher else metric, loss)

    rows.sort(key=key)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank if row["status"] == "done" else None
    return rows


def write_summary(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .monitor import read_metrics

    out = Path(sweep.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["rank", "name", "status", "metric", "last_loss", "examples_per_second", "step"]
    if sweep.metric not in HIGHER_IS_BETTER:
        columns.insert(4, "chosen_step")
    lines = [f"| {' | '.join(c if c != 'metric' else sweep.metric for c in columns)} |",
             f"|{'---|' * len(columns)}"]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value)))
        lines.append(f"| {' | '.join(cells)} |")
    table = out / "summary.md"
    table.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    fig, (ax_rank, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    done = [r for r in rows if r["status"] == "done"]
    ax_rank.barh([r["name"] for r in done][::-1], [r.get("metric", 0.0) for r in done][::-1])
    ax_rank.set_xlabel(f"validation {sweep.metric}" + ("" if sweep.metric in HIGHER_IS_BETTER
                                                       else " of the chosen checkpoint (lower is better)"))
    ax_rank.set_title("sweep ranking")
    for point in sweep.points:
        train = [r for r in read_metrics(point.config["training"]["out_dir"]) if r["kind"] == "train"]
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=point.name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    if any(ax_loss.get_lines()):
        ax_loss.legend(fontsize=6)
    fig.tight_layout()
    plot = out / "sweep.png"
    fig.savefig(plot, dpi=80)
    plt.close(fig)
    return {"table": table, "plot": plot}
