"""Downsample and mesh on FIB-25 through our fq:// queue and worker versus calling the same
igneous task objects directly, in the same run on the same data: the overhead ratio.

Both sides run in one process (a worker on a cluster is long-lived, so process start-up is
not part of the per-task cost); ours adds serialization, the file-queue lease and delete,
the failure ledger and the runner's stage records.

    .venv/bin/python bench/bench_stage_overhead.py
"""

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the runner tests' task-list stage
from common import emit, require_fib25, timed  # noqa: E402

from exaconnect.services.downsample import create_downsample_tasks  # noqa: E402
from exaconnect.services.ingest import IngestOptions, ingest_now  # noqa: E402
from exaconnect.services.mesh import create_mesh_forge_tasks  # noqa: E402
from exaconnect.services.runner import RunnerOptions, run_stages  # noqa: E402
from runner_tasks import task_stage  # noqa: E402


def run_direct(tasks) -> None:
    from taskqueue.queueables import totask

    for task in tasks:
        totask(task).execute()


def run_queued(queue_root: str, tasks) -> None:
    """Through the runner, as every stage runs: enqueue on a file queue, one in-process worker."""
    stage = task_stage("bench", "mesh", lambda: tasks)
    run_stages([stage], RunnerOptions(queue_root, f"{queue_root}/records", workers=1, progress=False, poll_seconds=0.05))


def main(repeats: int = 2) -> None:
    fib = require_fib25()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ingest_now(str(fib / "grayscale_maps"), str(tmp / "image"), IngestOptions("image", (10, 10, 10), chunk_size=(32, 32, 32)), progress=False)
        ingest_now(f"{fib}/groundtruth.h5:stack", str(tmp / "labels"), IngestOptions("segmentation", (10, 10, 10), chunk_size=(32, 32, 32)), progress=False)
        for stage, make_tasks, cleanup in (
            # 64^3 tasks (one mip each) expose the per-task cost of the file queue; 128^3 tasks
            # (two mips each) are closer to production task sizes.
            ("downsample64", lambda: list(create_downsample_tasks(str(tmp / "image"), num_mips=1, memory_target=300_000)), lambda: [shutil.rmtree(p, ignore_errors=True) for p in (tmp / "image").glob("20_*")] + [shutil.rmtree(p, ignore_errors=True) for p in (tmp / "image").glob("40_*")]),
            ("downsample128", lambda: list(create_downsample_tasks(str(tmp / "image"), num_mips=2, memory_target=2_400_000)), lambda: [shutil.rmtree(p, ignore_errors=True) for p in (tmp / "image").glob("20_*")] + [shutil.rmtree(p, ignore_errors=True) for p in (tmp / "image").glob("40_*")]),
            ("mesh", lambda: list(create_mesh_forge_tasks(str(tmp / "labels"), shape=(64, 64, 64))), lambda: shutil.rmtree(tmp / "labels" / "mesh_mip_0_err_40.0", ignore_errors=True)),
        ):
            direct, queued = [], []
            for r in range(repeats):  # alternate so drift in machine load hits both sides
                cleanup()
                tasks = make_tasks()
                direct.append(timed(run_direct, tasks)[0])
                cleanup()
                tasks = make_tasks()
                queued.append(timed(run_queued, str(tmp / f"q-{stage}-{r}"), tasks)[0])
            figures[f"{stage}_tasks"] = len(tasks)
            figures[f"{stage}_direct_s"] = round(min(direct), 3)
            figures[f"{stage}_queued_s"] = round(min(queued), 3)
            figures[f"{stage}_overhead_ratio"] = round(min(queued) / min(direct), 3)
            figures[f"{stage}_mvoxels_per_s_queued"] = round(250 ** 3 / 1e6 / min(queued), 2)
            figures[f"{stage}_queue_ms_per_task"] = round(1000 * (min(queued) - min(direct)) / len(tasks), 1)
    emit("stage_overhead_fib25", **figures)


if __name__ == "__main__":
    main()
