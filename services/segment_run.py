"""Run a whole segmentation (passes, faces, equivalence, relabel, downsample) through one
queue with local worker processes: what `make demo`, the tests and the benchmarks use, and the
order in which a cluster operator enqueues the same stages by hand.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from exaconnect.errors import ExaconnectError
from exaconnect.precomputed.bbox import Box, Triple
from exaconnect.precomputed.stitching import MatchOptions
from exaconnect.services.segment_staging import PassSpec, SegmentRun

log = logging.getLogger("exaconnect.segment")


@dataclass(frozen=True)
class SegmentPlan:
    image_layer: str
    segmentation_layer: str
    passes: tuple[PassSpec, ...]
    subvolume: Triple = (256, 256, 256)
    overlap: Triple = (32, 32, 32)
    bbox: Box | None = None
    staging: str | None = None
    match: MatchOptions = MatchOptions()
    downsample_mips: int = 2
    overwrite: bool = True


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)


def run_stage(queue: str, name: str, tasks: list, workers: int, lease_seconds: int = 1800) -> tuple[float, int]:
    """Enqueue a batch, drain it with local worker processes, fail loudly on dead letters."""
    from exaconnect.services.queue import enqueue, open_queue, queue_status
    from exaconnect.services.worker import WorkerOptions, run_workers

    started = time.perf_counter()
    open_queue(queue).purge()
    shutil.rmtree(Path(queue) / "dead-letter", ignore_errors=True)
    shutil.rmtree(Path(queue) / "failures", ignore_errors=True)
    count = enqueue(queue, tasks, description=name)
    run_workers(queue, WorkerOptions(lease_seconds=lease_seconds, exit_when_empty=True, idle_poll_seconds=0.2),
                processes=min(workers, max(count, 1)))
    status = queue_status(queue)
    if status.failed or status.enqueued:
        raise ExaconnectError(f"stage {name}: {status.failed} tasks failed, {status.enqueued} left on {queue}")
    return time.perf_counter() - started, count


def segment_volume(plan: SegmentPlan, queue: str, workers: int = 2) -> tuple[SegmentRun, StageTimes]:
    from exaconnect.services.downsample import create_downsample_tasks
    from exaconnect.services.segment import add_pass, create_segment_tasks, prepare_run
    from exaconnect.services.stitch import create_equivalence_tasks, create_faces_tasks, create_relabel_tasks

    times = StageTimes()
    run = prepare_run(plan.image_layer, plan.segmentation_layer, plan.subvolume, plan.overlap, plan.bbox,
                      plan.staging, plan.match, overwrite=plan.overwrite)
    for spec in plan.passes:
        run = add_pass(run.staging, spec)
        stage = f"segment-{spec.name}"
        times.seconds[stage], times.tasks[stage] = run_stage(queue, stage, create_segment_tasks(run, spec.name), workers)
    for stage, make in (("stitch-faces", create_faces_tasks), ("stitch-equivalence", create_equivalence_tasks),
                        ("stitch-relabel", create_relabel_tasks)):
        times.seconds[stage], times.tasks[stage] = run_stage(queue, stage, make(run), workers)
    if plan.downsample_mips > 0:
        tasks = list(create_downsample_tasks(run.segmentation_layer, num_mips=plan.downsample_mips))
        times.seconds["downsample"], times.tasks["downsample"] = run_stage(queue, "downsample", tasks, workers)
    return run, times
