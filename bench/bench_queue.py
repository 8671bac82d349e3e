"""The file queue at scale: tiny tasks drained by W worker processes, before and after sharding.

    nice -n 5 .venv/bin/python bench/bench_queue.py [--tasks 20000] [--workers 4,16,64,256] [--shards 64]

For each worker count, the same N no-op tasks are drained twice from a local folder:

- `upstream`: python-task-queue's flat `fq://` folder with the loop our worker ran before
  (`TaskQueue.lease`, run, `TaskQueue.delete(tally=True)`);
- `sharded`: our `FileQueue` (N tasks spread over S sub-folders) drained by the real `Worker`
  (attempts in the lease name, a lease-keeper process per worker, dead-letter checks).

Workers are forked from this process after the imports and start together on a barrier, so
interpreter start-up is not timed. Each worker counts the tasks it ran in its own row of a
shared-memory table (which survives a worker that crashes); the run checks that every task ran
exactly once, and stops timing when the completion tally reaches N (or after 60 s without
progress: `stalled`). Lease latency is the time of one successful lease call (scan,
rename, read); empty polls (a lease that found nothing, then a 50 ms sleep) are counted apart.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import emit  # noqa: E402
from worker_tasks import NoopTask  # noqa: E402

from exaconnect.services.file_queue import FileQueue  # noqa: E402
from exaconnect.services.queue import enqueue  # noqa: E402
from exaconnect.services.worker import Worker, WorkerOptions  # noqa: E402

IDLE_POLL = 0.05


def _record(out: Path, latencies: list[float], empty: int) -> None:
    np.save(out / f"{os.getpid()}-lat.npy", np.asarray(latencies, dtype=np.float64))
    (out / f"{os.getpid()}-empty.txt").write_text(str(empty))


def _upstream_worker(queue: str, out: Path, ready, go, stop, runs) -> None:
    from taskqueue import QueueEmptyError, TaskQueue

    tq = TaskQueue("fq://" + queue, progress=False)
    latencies, empty = [], 0
    original = NoopTask.execute
    ready.release()
    go.wait()
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                task = tq.lease(seconds=600)
            except QueueEmptyError:
                empty += 1
                if tq.is_empty():
                    break
                time.sleep(IDLE_POLL)
                continue
            latencies.append(time.perf_counter() - t0)
            original(task)
            runs[task.index] += 1
            tq.delete(task, tally=True)  # as the old worker: an exception here ended the worker
    finally:
        _record(out, latencies, empty)


def _sharded_worker(queue: str, out: Path, ready, go, stop, runs) -> None:
    logging.getLogger("exaconnect").setLevel(logging.WARNING)
    latencies, empty = [], [0]
    lease = FileQueue.lease

    def timed_lease(self, seconds):
        t0 = time.perf_counter()
        result = lease(self, seconds)
        if result is None:
            empty[0] += 1
        else:
            latencies.append(time.perf_counter() - t0)
        return result

    FileQueue.lease = timed_lease
    def execute(self):
        runs[self.index] += 1

    NoopTask.execute = execute
    ready.release()
    go.wait()
    Worker(queue, WorkerOptions(lease_seconds=600, exit_when_empty=True, idle_poll_seconds=IDLE_POLL,
                                task_modules=("worker_tasks",))).run()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _record(out, latencies, empty[0])


def _completed(queue: Path) -> int:
    path = queue / "completions"
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir())
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def drain(layout: str, n_tasks: int, workers: int, shards: int, root: Path) -> dict:
    queue = root / f"{layout}-{workers}"
    out = root / f"{layout}-{workers}-out"
    out.mkdir()
    tasks = [NoopTask(i) for i in range(n_tasks)]
    t0 = time.perf_counter()
    if layout == "upstream":
        from taskqueue import TaskQueue

        TaskQueue("fq://" + str(queue), progress=False).insert(tasks, parallel=1)
    else:
        FileQueue(queue, create=True, shards=shards)
        enqueue(str(queue), tasks)
    insert_s = time.perf_counter() - t0
    context = multiprocessing.get_context("fork")
    ready, go, stop = context.Semaphore(0), context.Event(), context.Event()
    target = _upstream_worker if layout == "upstream" else _sharded_worker
    # One row of run counts per worker, in shared memory: survives a worker that crashes or is killed.
    runs_shared = context.RawArray("i", workers * n_tasks)
    rows = [np.frombuffer(runs_shared, dtype=np.int32)[k * n_tasks:(k + 1) * n_tasks] for k in range(workers)]
    procs = [context.Process(target=target, args=(str(queue), out, ready, go, stop, rows[k])) for k in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    t0 = time.perf_counter()
    go.set()
    # Done when every task has completed (the completion tally reaches N) or every worker has
    # left: upstream can leave a completed task's file behind under a 600 s lease (see below),
    # and its workers would wait for that lease to run out and then run the task again.
    # A run stalls when a crashed worker's task stays leased (600 s): stop after 60 s without progress.
    done, last_done, last_progress, stalled = 0, 0, time.perf_counter(), False
    while any(p.is_alive() for p in procs) and done < n_tasks:
        time.sleep(0.05)
        done = _completed(queue)
        if done > last_done:
            last_done, last_progress = done, time.perf_counter()
        elif time.perf_counter() - last_progress > 60:
            stalled = True
            break
    drain_s = last_progress - t0 if stalled else time.perf_counter() - t0
    stop.set()
    deadline = time.time() + 10
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)  # our Worker finishes its task and leaves; upstream's just stops
    for p in procs:
        p.join()
    lat = np.concatenate([np.load(p) for p in out.glob("*-lat.npy")]) * 1e3
    empty = sum(int(p.read_text()) for p in out.glob("*-empty.txt"))
    counts = np.frombuffer(runs_shared, dtype=np.int32).reshape(workers, n_tasks).sum(axis=0)
    leftovers = [p for p in queue.rglob("*") if p.is_file() and p.stat().st_size == 0]
    task_dir = queue / "queue"
    stale = [p for p in task_dir.rglob("*.json")]
    result = {
        "workers": workers,
        "tasks_per_s": round(int((counts > 0).sum()) / drain_s, 1),
        "stalled": stalled,
        "workers_crashed": sum(1 for p in procs if p.exitcode not in (0, -signal.SIGTERM)),
        "drain_s": round(drain_s, 2),
        "lease_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "lease_ms_p95": round(float(np.percentile(lat, 95)), 2),
        "lease_ms_p99": round(float(np.percentile(lat, 99)), 2),
        "empty_polls": empty,
        "exactly_once": bool((counts == 1).all()),
        "ran_twice": int((counts > 1).sum()),
        "never_ran": int((counts == 0).sum()),
        "empty_files_left": len(leftovers),
        "task_files_left_after_all_completed": len(stale),
        "worker_exit_codes": sorted({p.exitcode for p in procs}),
        "insert_per_s": round(n_tasks / insert_s, 1),
    }
    shutil.rmtree(queue, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"layout": layout, **result}), file=sys.stderr, flush=True)
    return result


def warm_up(root: Path) -> None:
    """Run one real worker over a three-task queue in this process before any fork, so that
    everything a worker imports on its first lease (cloud-volume and the codecs, through the
    chunk guard and the task registry: about a CPU-second) is already loaded in every child.
    Otherwise 256 workers start by importing at once and a 2-core machine spends minutes on that
    inside the timed window (the stall seen at 256 workers before this warm-up)."""
    queue = root / "warm-up"
    FileQueue(queue, create=True, shards=2)
    enqueue(str(queue), [NoopTask(i) for i in range(3)])
    Worker(str(queue), WorkerOptions(lease_seconds=600, exit_when_empty=True, idle_poll_seconds=IDLE_POLL,
                                     task_modules=("worker_tasks",))).run()
    from taskqueue import TaskQueue  # the upstream workers' one import

    del TaskQueue
    shutil.rmtree(queue, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--workers", default="4,16,64,256")
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--layouts", default="upstream,sharded")
    parser.add_argument("--dir", default=None, help="where the queues live (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    counts = [int(w) for w in args.workers.split(",")]
    layouts = args.layouts.split(",")
    rows: dict[str, list] = {layout: [] for layout in layouts}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        warm_up(Path(tmp))
        for workers in counts:
            for layout in layouts:  # interleaved, so a change in machine load hits both alike
                rows[layout].append(drain(layout, args.tasks, workers, args.shards, Path(tmp)))
    emit("fq_queue_at_scale", tasks=args.tasks, shards=args.shards, cpus=os.cpu_count(),
         note="local ext4/overlay folder; tiny no-op tasks; worker start-up not timed", **rows)


if __name__ == "__main__":
    main()
