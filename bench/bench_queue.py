"""Queue overhead: empty tasks leased, run and deleted per second by 2 worker processes on fq://.

    .venv/bin/python bench/bench_queue.py [N_TASKS]
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import emit  # noqa: E402
from worker_tasks import NoopTask  # noqa: E402

from exaconnect.services.queue import enqueue, queue_status  # noqa: E402
from exaconnect.services.worker import WorkerOptions, run_workers  # noqa: E402


def main(n_tasks: int = 2000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        queue = str(Path(tmp) / "q")
        t0 = time.perf_counter()
        enqueue(queue, [NoopTask(i) for i in range(n_tasks)])
        insert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_workers(queue, WorkerOptions(exit_when_empty=True, idle_poll_seconds=0.05, task_modules=("worker_tasks",)), processes=2)
        drain_s = time.perf_counter() - t0
        status = queue_status(queue)
        assert status.completed == n_tasks and status.enqueued == 0, status
    emit("fq_queue_overhead", tasks=n_tasks, workers=2, inserted_per_s=round(n_tasks / insert_s, 1),
         leased_and_deleted_per_s=round(n_tasks / drain_s, 1), drain_seconds_incl_worker_start=round(drain_s, 2))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
