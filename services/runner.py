"""The one runner: stages in dependency order, each enqueued on its service's queue once what it
requires is complete, drained by local worker processes (or by remote workers on PBS or
Kubernetes while the runner waits), and recorded as complete in the run's store.

Resuming. A stage's record (`stages/NAME.json`, written through the ArtifactStore with its
`.done` marker) holds the fingerprint of its parameters and of everything upstream; a second
run skips every stage whose record still matches. A stage that was enqueued but not finished
(`stages/NAME.enqueued.json`) is not enqueued again: its queue still holds exactly the tasks
that did not finish, so a run killed at any point resumes with at most the running tasks redone
(in local mode their leases, held by workers that died with the runner, are released first).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from exaconnect.errors import ExaconnectError, InputError
from exaconnect.precomputed.store import ArtifactStore
from exaconnect.services.stages import Stage, fingerprint, order_stages

log = logging.getLogger("exaconnect.runner")


class StageFailed(ExaconnectError):
    """A stage ended with dead-lettered tasks (the message says where to look)."""


@dataclass(frozen=True)
class RunnerOptions:
    queue_root: str
    record: str
    # Local worker processes per stage; 1 runs tasks in this process; 0 leaves the queues to
    # remote workers (PBS, Kubernetes) and waits for them.
    workers: int = 2
    poll_seconds: float = 1.0
    progress: bool = True
    max_attempts: int = 3
    # Remote mode: give up when a stage's queue has not moved for this long (None: wait forever).
    stall_seconds: float | None = None
    # Overrides of every stage's lease (at least the worker's minimum), and extra task modules
    # for local workers (a lab's own task classes; the fault-injection suite's instrumentation).
    lease_seconds: int | None = None
    task_modules: tuple[str, ...] = ()


@dataclass
class StageResult:
    name: str
    status: str  # "done" (ran now) or "skipped" (complete from an earlier run)
    tasks: int
    seconds: float
    fingerprint: str = ""


@dataclass
class RunReport:
    results: dict[str, StageResult] = field(default_factory=dict)

    @property
    def seconds(self) -> dict[str, float]:
        return {name: r.seconds for name, r in self.results.items()}

    def as_dict(self) -> dict:
        return {name: {"status": r.status, "tasks": r.tasks, "seconds": round(r.seconds, 3)}
                for name, r in self.results.items()}


def service_queue(queue_root: str, service: str) -> str:
    """The queue of one service under the run's queue root: a sub-folder of a file queue root,
    or `PREFIX-SERVICE` for an SQS name prefix (SQS names cannot contain '/')."""
    root = str(queue_root)
    if root.startswith(("sqs://", "https://", "http://")):
        return f"{root.rstrip('/-')}-{service}"
    if root.startswith("fq://"):
        return f"{root.rstrip('/')}/{service}"
    return os.path.join(root, service)


def _record_key(stage: Stage) -> str:
    return f"stages/{stage.name}.json"


def _enqueued_key(stage: Stage) -> str:
    return f"stages/{stage.name}.enqueued.json"


def stage_records(record: str) -> dict[str, dict]:
    """Completed-stage records of a run, by stage name (for `exaconnect run --status`)."""
    store = ArtifactStore(record)
    out = {}
    if store.root is not None and os.path.isdir(os.path.join(store.root, "stages")):
        for path in sorted(Path(store.root, "stages").glob("*.json")):
            if path.name.endswith(".enqueued.json"):
                continue
            value = store.get_json(f"stages/{path.name}")
            if value is not None:
                out[path.name[: -len(".json")]] = value
    return out


def _enqueue_stage(stage: Stage, queue: str, progress: bool) -> int:
    from exaconnect.services.queue import enqueue, open_queue, purge_queue

    # An interrupted enqueue (or an older run's tasks) may have left tasks behind: start clean.
    open_queue(queue)
    purge_queue(queue, dead_letters=True)
    tasks = list(stage.make_tasks())
    if not tasks:
        return 0
    return enqueue(queue, tasks, description=stage.name) if progress else _quiet_enqueue(queue, tasks)


def _quiet_enqueue(queue: str, tasks: list) -> int:
    from exaconnect.services.queue import open_queue

    return int(open_queue(queue).insert(tasks, parallel=1))


def _release_local_leases(queue: str) -> None:
    """Leases held by local workers that died with an earlier runner: nobody else works on a
    local run's queues, so they are given back now instead of after the lease time."""
    from exaconnect.services.queue import open_queue

    tq = open_queue(queue)
    release = getattr(tq, "release_all", None)
    if release is not None:
        count = release()
        if count:
            log.info("released %s leases held by workers of an earlier run on %s", count, queue)


def _watch(queue: str, total: int, name: str, stop: threading.Event, options: RunnerOptions) -> None:
    """Progress of a stage while something else drains its queue: a tqdm bar (rate, time left)
    on a terminal; in a log, one line per tenth of the stage (or per minute) with the same."""
    import sys

    from tqdm import tqdm

    from exaconnect.services.queue import queue_status

    def done_now() -> tuple[int, int]:
        try:
            status = queue_status(queue)
        except ExaconnectError:
            return -1, 0
        return min(total, max(0, total - status.enqueued)), status.failed

    if not options.progress:
        stop.wait()
        return
    if sys.stderr.isatty():
        with tqdm(total=total, desc=name, unit="task", leave=True, mininterval=0.5) as bar:
            while not stop.wait(options.poll_seconds):
                done, failed = done_now()
                if done >= 0:
                    bar.n = done
                    if failed:
                        bar.set_postfix(failed=failed)
                    bar.refresh()
            bar.n = max(done_now()[0], bar.n)
            bar.refresh()
        return
    started, last_line, last_done = time.monotonic(), time.monotonic(), 0
    step = max(1, total // 10)
    while not stop.wait(options.poll_seconds):
        done, failed = done_now()
        now = time.monotonic()
        if done < 0 or (done - last_done < step and now - last_line < 60):
            continue
        rate = done / max(now - started, 1e-9)
        pace = (f"{rate:.2f} tasks/s, about {(total - done) / rate:.0f} s left" if rate > 0
                else f"running for {now - started:.0f} s")
        print(f"[run] {name}: {done}/{total} tasks, {pace}" + (f", {failed} dead-lettered" if failed else ""),
              file=sys.stderr, flush=True)
        last_line, last_done = now, done


def _drain_locally(stage: Stage, queue: str, count: int, options: RunnerOptions) -> None:
    """Local workers drain the stage's queue. Workers that stop early (SIGTERM, the restart
    limit) leave tasks behind: new ones are started while tasks remain and nothing is
    dead-lettered, a few rounds at most."""
    from exaconnect.services.queue import queue_status
    from exaconnect.services.worker import Worker, WorkerOptions, run_workers

    worker_options = WorkerOptions(lease_seconds=max(options.lease_seconds or stage.lease_seconds, 10),
                                   exit_when_empty=True, idle_poll_seconds=0.2, max_attempts=options.max_attempts,
                                   # A failed task is retried after seconds, not after its lease: the
                                   # runner waits on this stage, and an hour-long segment lease would
                                   # stall it on every retry of a deterministic failure.
                                   retry_delay_seconds=2.0,
                                   task_modules=tuple(options.task_modules),
                                   log_level="INFO" if log.isEnabledFor(logging.INFO) else "WARNING")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(queue, count, stage.name, stop, options), daemon=True)
    watcher.start()
    try:
        for _ in range(5):
            if options.workers == 1:
                Worker(queue, worker_options).run()
            else:
                run_workers(queue, worker_options, processes=max(1, min(options.workers, count)))
            status = queue_status(queue)
            if status.enqueued == 0 or status.failed:
                break
            log.warning("stage %s: %d tasks left after the workers stopped; starting workers again",
                        stage.name, status.enqueued)
    finally:
        stop.set()
        watcher.join()


def _wait_for_remote(stage: Stage, queue: str, count: int, options: RunnerOptions) -> None:
    """Remote workers drain the queue; wait until it is empty, showing progress."""
    from exaconnect.services.queue import queue_status

    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(queue, count, stage.name, stop, options), daemon=True)
    watcher.start()
    last, moved = None, time.monotonic()
    try:
        while True:
            status = queue_status(queue)
            if status.enqueued == 0:
                return
            if status.enqueued != last:
                last, moved = status.enqueued, time.monotonic()
            elif options.stall_seconds is not None and time.monotonic() - moved > options.stall_seconds:
                raise StageFailed(f"stage {stage.name}: {status.enqueued} tasks on {queue} have not moved for "
                                  f"{options.stall_seconds:.0f} s; are workers running on it?")
            time.sleep(options.poll_seconds)
    finally:
        stop.set()
        watcher.join()


def _check_dead_letters(stage: Stage, queue: str) -> None:
    from exaconnect.services.queue import FailureLedger, queue_status

    status = queue_status(queue)
    if status.failed or status.enqueued:
        ledger = FailureLedger.for_queue(queue)
        first = ""
        records = ledger.dead_records()
        if records:
            failures = records[0].get("failures") or [{}]
            last_line = str(failures[-1].get("error", "")).strip().splitlines()[-1:] or [""]
            first = f"; first: {last_line[0]}"
        raise StageFailed(f"stage {stage.name}: {status.failed} tasks dead-lettered, {status.enqueued} left on {queue}"
                          f" (see {ledger.dead_letter}){first}")


def run_stages(stages: Sequence[Stage], options: RunnerOptions,
               on_complete: Callable[[Stage, StageResult], None] | None = None) -> RunReport:
    """Run `stages` to completion (see the module docstring); returns what each stage did."""
    if options.workers < 0:
        raise InputError(f"--workers {options.workers}: expected 0 (remote workers) or more")
    ordered = order_stages(stages)
    store = ArtifactStore(options.record)
    prints: dict[str, str] = {}
    report = RunReport()
    for stage in ordered:
        prints[stage.name] = fp = fingerprint(stage, [prints[r] for r in stage.requires])
        queue = service_queue(options.queue_root, stage.service)
        record = store.get_json(_record_key(stage))
        if record is not None and record.get("fingerprint") == fp:
            result = StageResult(stage.name, "skipped", int(record.get("tasks", 0)), 0.0, fp)
            report.results[stage.name] = result
            log.info("stage %s: complete from an earlier run, skipped", stage.name)
            if options.progress:
                print(f"[run] {stage.name}: done earlier ({result.tasks} tasks), skipped", flush=True)
            continue
        started = time.perf_counter()
        enqueued = store.get_json(_enqueued_key(stage))
        if enqueued is not None and enqueued.get("fingerprint") == fp:
            count = int(enqueued["tasks"])
            log.info("stage %s: resuming its %d tasks on %s", stage.name, count, queue)
            if options.progress:
                print(f"[run] {stage.name}: resuming (enqueued earlier: {count} tasks)", flush=True)
            if options.workers > 0:
                _release_local_leases(queue)
        else:
            store.delete(_record_key(stage))
            count = _enqueue_stage(stage, queue, options.progress)
            store.put_json(_enqueued_key(stage), {"fingerprint": fp, "tasks": count, "queue": queue,
                                                  "time": time.time()})
        if count:
            if options.workers > 0:
                _drain_locally(stage, queue, count, options)
            else:
                _wait_for_remote(stage, queue, count, options)
            _check_dead_letters(stage, queue)
        seconds = time.perf_counter() - started
        result = StageResult(stage.name, "done", count, seconds, fp)
        store.put_json(_record_key(stage), {"fingerprint": fp, "tasks": count, "seconds": seconds,
                                            "finished": time.time(), "reads": list(stage.reads),
                                            "writes": list(stage.writes), "requires": list(stage.requires),
                                            "parameters": dict(stage.parameters)})
        store.delete(_enqueued_key(stage))
        report.results[stage.name] = result
        if options.progress:
            print(f"[run] {stage.name}: {count} tasks in {seconds:.1f}s", flush=True)
        if on_complete is not None:
            on_complete(stage, result)
    return report


def forget_stages(record: str, names: Sequence[str]) -> None:
    """Make the named stages run again on the next run (their records are removed)."""
    store = ArtifactStore(record)
    for name in names:
        store.delete(f"stages/{name}.json")
        store.delete(f"stages/{name}.enqueued.json")
