"""Training as queue tasks: one FFN training run per task (hyperparameter sweeps), and the
partition volume of a big label layer computed block by block.

A training task carries its whole config as JSON (serializable, self-contained), trains
into the config's out_dir and writes `result.json` there. A retried task (lease expired,
node killed) resumes from the run's latest checkpoint, so set the worker lease above
`training.checkpoint_every_seconds` and the run's time budget.

The partition of a block depends only on labels within `lom_radius` of it, so blocks read
that halo and write their own voxels into a uint8 image layer: the same values as the
whole-volume computation, except that `min_size` counts an object's voxels inside the block
and its halo only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
from taskqueue import RegisteredTask

from exaconnect.errors import InputError
from exaconnect.services.stages import Stage
from exaconnect.precomputed.bbox import Box, chunk_grid
from exaconnect.precomputed.layers import (
    LayerSpec,
    Provenance,
    create_layer,
    layer_bounds,
    layer_url,
    open_layer,
    read_box,
    write_box,
)


class TrainTask(RegisteredTask):
    """Train one FFN configuration (a sweep point) and record its metrics."""

    def __init__(self, config_json: str, name: str):
        super().__init__(config_json, name)

    def execute(self) -> None:
        from exaconnect.ffn.training.config import train_config_from_dict
        from exaconnect.ffn.training.loop import train
        from exaconnect.ffn.training.sweep import write_result

        config = train_config_from_dict(json.loads(self.config_json), f"train task {self.name}")
        # Workers have no terminal: with training.progress the loop prints one line per
        # progress_every_steps (rate, time left) instead of a bar; metrics.jsonl has the rest.
        result = train(config, on_evaluation_checkpoint=evaluation_enqueuer(config))
        write_result(config.training.out_dir, result, self.name)


class CheckpointEvalTask(RegisteredTask):
    """Segment the run's evaluation boxes with one checkpoint and record VI / adapted Rand
    error / unsegmented fraction (ffn.training.evaluation). Idempotent: a finished record is
    kept, so a retried or duplicated task costs nothing."""

    def __init__(self, run_dir: str, step: int, prefix: str | None = None):
        super().__init__(run_dir, step, prefix)

    def execute(self) -> None:
        from exaconnect.ffn.training.evaluation import evaluate_checkpoint

        evaluate_checkpoint(self.run_dir, int(self.step), self.prefix)


def create_evaluation_tasks(run_dir: str, every_steps: int | None = None,
                            steps: list[int] | None = None) -> list[CheckpointEvalTask]:
    """One task per kept checkpoint of the run that has no evaluation record yet."""
    from exaconnect.ffn.training.evaluation import list_checkpoints, pending_steps, run_config

    config = run_config(run_dir)
    if not config.evaluation.boxes:
        raise InputError(f"{run_dir}/config.yaml: evaluation.boxes is empty; name the validation boxes to segment")
    prefixes = list_checkpoints(run_dir)
    return [CheckpointEvalTask(str(run_dir), step, prefixes[step])
            for step in pending_steps(run_dir, every_steps, steps)]


def evaluation_enqueuer(config):
    """The training loop's callback: enqueue each evaluation checkpoint on evaluation.queue
    (None when the config has no queue: the loop then evaluates in process)."""
    root = config.evaluation.queue
    if not root:
        return None
    from exaconnect.services.runner import service_queue

    queue = service_queue(root, "train")

    def enqueue_checkpoint(run_dir, step: int, prefix: str) -> None:
        from exaconnect.services.queue import enqueue

        enqueue(queue, [CheckpointEvalTask(str(run_dir), int(step), str(prefix))], total=1,
                description="checkpoint evaluation")

    return enqueue_checkpoint


def create_sweep_tasks(sweep_path: str) -> list[TrainTask]:
    from exaconnect.ffn.training.sweep import load_sweep

    sweep = load_sweep(sweep_path)
    return [TrainTask(json.dumps(point.config), point.name) for point in sweep.points]


class PartitionTask(RegisteredTask):
    """Partition values of one block of a label layer, written into a partition layer."""

    def __init__(self, labels: str, dest: str, box: list[int], lom_radius_zyx: list[int], thresholds: list[float],
                 min_size: int):
        super().__init__(labels, dest, box, lom_radius_zyx, thresholds, min_size)

    def execute(self) -> None:
        from exaconnect.ffn.training.data import compute_partitions

        labels_vol = open_layer(self.labels, layer_type="segmentation")
        bounds = layer_bounds(labels_vol)
        box = Box.from_list(self.box)
        radius_xyz = list(reversed(self.lom_radius_zyx))
        grown = box.grow(radius_xyz).intersection(bounds)
        labels = read_box(labels_vol, grown)
        parts = compute_partitions(labels, self.thresholds, self.lom_radius_zyx, int(self.min_size))
        # Where the halo is cut by the volume's edge the box does not fit: no partition there,
        # which compute_partitions already did for the grown block's own margin.
        offset = [b - g for b, g in zip(box.start, grown.start)]
        x0, y0, z0 = offset
        sx, sy, sz = box.shape
        write_box(open_layer(self.dest), box, parts[z0:z0 + sz, y0:y0 + sy, x0:x0 + sx])


def create_partition_tasks(labels: str, dest: str, lom_radius_zyx, thresholds, min_size: int = 10000,
                           block_size=(128, 128, 128), bbox: Box | None = None) -> list[PartitionTask]:
    """Creates the partition layer (uint8 image, same geometry as `labels`) and one task per block."""
    labels, dest = layer_url(labels), layer_url(dest)
    labels_vol = open_layer(labels, layer_type="segmentation")
    bounds = layer_bounds(labels_vol)
    box = bounds if bbox is None else bbox.intersection(bounds)
    if box.empty():
        raise InputError(f"bbox {bbox} does not intersect layer {labels} ({bounds})")
    spec = LayerSpec(layer_type="image", dtype="uint8", size=tuple(bounds.shape),
                     resolution=tuple(float(r) for r in labels_vol.meta.resolution(0)),
                     voxel_offset=tuple(bounds.start), chunk_size=tuple(int(c) for c in block_size), encoding="raw")
    provenance = Provenance(stage="train-partition", parameters={
        "lom_radius_zyx": list(lom_radius_zyx), "thresholds": list(thresholds), "min_size": min_size},
        inputs=[labels])
    create_layer(dest, spec, provenance)
    return [PartitionTask(labels, dest, cell.write.to_list(),
                          [int(r) for r in lom_radius_zyx], [float(t) for t in thresholds], int(min_size))
            for cell in chunk_grid(box, block_size, align_to=block_size, grid_origin=bounds.start)]


@dataclass(frozen=True)
class TrainDemoModel(Stage):
    """The small demo FFN, trained a fixed number of steps from `config` (a training config mapping)."""

    service: ClassVar[str] = "train"
    stage_name: ClassVar[str] = "train.demo-model"
    lease_seconds: ClassVar[int] = 3600
    description: ClassVar[str] = "the small demo FFN, a fixed number of steps"
    config: Mapping[str, Any]
    out_dir: str

    def make_tasks(self) -> list:
        return [TrainTask(json.dumps(dict(self.config)), "demo-model")]

    def writes(self) -> tuple[str, ...]:
        return (self.out_dir,)


@dataclass(frozen=True)
class TrainEvaluate(Stage):
    """Every pending checkpoint of a training run segmented on its evaluation boxes."""

    service: ClassVar[str] = "train"
    stage_name: ClassVar[str] = "train.evaluate"
    description: ClassVar[str] = "checkpoint evaluation"
    run_dir: str
    every_steps: int | None = None
    steps: tuple[int, ...] | None = None
    pending: tuple[int, ...] = ()

    def make_tasks(self) -> list:
        return create_evaluation_tasks(self.run_dir, self.every_steps, list(self.steps) if self.steps else None)

    def reads(self) -> tuple[str, ...]:
        return (self.run_dir,)


@dataclass(frozen=True)
class TrainPartition(Stage):
    """The partition volume (local object masks by threshold) of a labels volume, per block."""

    service: ClassVar[str] = "train"
    stage_name: ClassVar[str] = "train.partition"
    description: ClassVar[str] = "partition volume for training"
    labels: str
    dest: str
    lom_radius_zyx: tuple[int, int, int]
    thresholds: tuple[float, ...]
    min_size: int = 10000
    block_size: tuple[int, int, int] = (256, 256, 256)

    def make_tasks(self) -> list:
        return create_partition_tasks(self.labels, self.dest, self.lom_radius_zyx, list(self.thresholds),
                                      self.min_size, self.block_size)

    def reads(self) -> tuple[str, ...]:
        return (self.labels,)

    def writes(self) -> tuple[str, ...]:
        return (self.dest,)


@dataclass(frozen=True)
class TrainSweep(Stage):
    """One training task per grid point of a sweep file (ffn/training/sweep.py)."""

    service: ClassVar[str] = "train"
    stage_name: ClassVar[str] = "train.sweep"
    lease_seconds: ClassVar[int] = 3600
    description: ClassVar[str] = "a training run per grid point"
    sweep: str

    def make_tasks(self) -> list:
        return create_sweep_tasks(self.sweep)

    def reads(self) -> tuple[str, ...]:
        return (self.sweep,)
