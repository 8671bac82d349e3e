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
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from exaconnect.errors import ExaconnectError, InputError
from exaconnect.precomputed.store import ArtifactStore
from exaconnect.services.stages import Stage, fingerprint, stage_graph

log = logging.getLogger("exaconnect.runner")


class StageFailed(ExaconnectError):
    """A stage ended with dead-lettered tasks (the message says where to look)."""


class RunStopped(ExaconnectError):
    """SIGTERM or Ctrl-C stopped the run; where it stopped is recorded, and a rerun resumes."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


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
    # Where workers keep their failure ledgers when not inside the file queue: one folder per
    # service below it (LEDGER_DIR/SERVICE, as `queue work --ledger-dir` is given on PBS and in
    # the Helm chart). None: each queue's own ledger.
    ledger_dir: str | None = None
    # Longest a task of a locally drained stage may run (None: no limit), as `queue work --task-timeout`.
    task_timeout_seconds: float | None = None
    # After SIGTERM or Ctrl-C: how long running tasks may take to finish before they are released.
    grace_seconds: float = 30.0
    # Hold RECORD/run.lock while running (a second run on the same record refuses, exit 2).
    lock: bool = True


def service_ledger(options: RunnerOptions, service: str) -> str | None:
    """The failure-ledger folder the workers of `service` use (None: inside the queue)."""
    return os.path.join(options.ledger_dir, service) if options.ledger_dir else None


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


def _enqueue_stage(stage: Stage, queue: str, progress: bool, ledger_dir: str | None = None) -> int:
    from exaconnect.services.queue import enqueue, open_queue, purge_queue

    # An interrupted enqueue (or an older run's tasks) may have left tasks behind: start clean.
    open_queue(queue)
    purge_queue(queue, ledger_dir=ledger_dir, dead_letters=True)
    tasks = list(stage.make_tasks())
    if not tasks:
        return 0
    return enqueue(queue, tasks, description=stage.name) if progress else _quiet_enqueue(queue, tasks)


def _quiet_enqueue(queue: str, tasks: list) -> int:
    from exaconnect.services.queue import open_queue

    return int(open_queue(queue).insert(tasks, parallel=1))


def _release_local_leases(queue: str, ledger_dir: str | None = None) -> None:
    """Leases held by local workers that died with an earlier runner: nobody else works on a
    local run's queues, so they are given back now instead of after the lease time. Failed tasks
    waiting out their retry delay hold no lease: they keep their delay and their attempt count."""
    from exaconnect.services.queue import FailureLedger, open_queue, waiting_out_retry_delay

    tq = open_queue(queue)
    release = getattr(tq, "release_all", None)
    if release is not None:
        ledger = FailureLedger.for_queue(queue, ledger_dir)
        failing = ledger.failing_ids()
        count = release(keep=lambda ident, ts: ident in failing and waiting_out_retry_delay(ledger, ident, ts))
        if count:
            log.info("released %s leases held by workers of an earlier run on %s", count, queue)


def _watch(queue: str, total: int, name: str, stop: threading.Event, options: RunnerOptions,
           ledger_dir: str | None = None) -> None:
    """Progress of a stage while something else drains its queue: a tqdm bar (rate, time left)
    on a terminal; in a log, one line per tenth of the stage (or per minute) with the same."""
    import sys

    from tqdm import tqdm

    from exaconnect.services.queue import queue_status

    def done_now() -> tuple[int, int]:
        try:
            status = queue_status(queue, ledger_dir)
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


class StopControl:
    """SIGTERM and Ctrl-C (SIGINT) while stages run. The first signal stops new tasks and stages
    and lets running tasks finish; after `grace_seconds`, or on a second signal, running tasks
    are released (given back to the queue, attempt refunded); ten seconds later workers still
    running (a task deaf to signals in a C call) are killed and their leases released by the
    runner. `requests` counts the steps: 1 finish, 2 release, 3 kill."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.requests = 0
        self.signum = 0
        self.done = threading.Event()
        self.worker = None  # the in-process Worker draining a stage now, if any
        self._previous: dict = {}

    @property
    def stopping(self) -> bool:
        return self.requests > 0

    def install(self) -> "StopControl":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        self.done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.requests += 1
        if self.requests == 1:
            self.signum = signum
            name = signal.Signals(signum).name
            print(f"[run] {name}: starting no new tasks or stages; running tasks get {self.grace_seconds:g} s to "
                  "finish (send it again to release them now)", file=sys.stderr, flush=True)
            threading.Thread(target=self._escalate, daemon=True).start()
        elif self.requests == 2:
            print("[run] releasing the running tasks now", file=sys.stderr, flush=True)
        if self.worker is not None and self.requests <= 2:
            self.worker.request_stop()  # may raise into the task this thread runs: it is released

    def _escalate(self) -> None:
        for wait in (self.grace_seconds, 10.0):
            if self.done.wait(wait):
                return
            os.kill(os.getpid(), signal.SIGTERM)  # handled as the next step, in the main thread


_ACTIVE: list[StopControl] = []  # the outermost run's, shared by runs nested in its process


def _drain_locally(stage: Stage, queue: str, count: int, options: RunnerOptions,
                   control: StopControl | None = None) -> None:
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
                                   task_timeout_seconds=options.task_timeout_seconds,
                                   ledger_dir=service_ledger(options, stage.service),
                                   log_level="INFO" if log.isEnabledFor(logging.INFO) else "WARNING")
    ledger_dir = service_ledger(options, stage.service)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(queue, count, stage.name, stop, options, ledger_dir), daemon=True)
    watcher.start()
    stop_requests = (lambda: control.requests) if control is not None else None
    try:
        for _ in range(5):
            if control is not None and control.stopping:
                break
            if options.workers == 1 and options.task_timeout_seconds is None:
                worker = Worker(queue, worker_options, own_sigterm=control is None)
                if control is not None:
                    control.worker = worker
                try:
                    worker.run()
                finally:
                    if control is not None:
                        control.worker = None
            elif options.workers == 1:  # a hung task's keeper kills its worker: not this process
                run_workers(queue, worker_options, processes=1, supervise=True, stop_requests=stop_requests)
            else:
                run_workers(queue, worker_options, processes=max(1, min(options.workers, count)),
                            stop_requests=stop_requests)
            if control is not None and control.stopping:
                break
            status = queue_status(queue, ledger_dir)
            if status.enqueued == 0 or status.failed:
                break
            log.warning("stage %s: %d tasks left after the workers stopped; starting workers again",
                        stage.name, status.enqueued)
    finally:
        stop.set()
        watcher.join()


def _wait_for_remote(stage: Stage, queue: str, count: int, options: RunnerOptions,
                     control: StopControl | None = None) -> None:
    """Remote workers drain the queue; wait until it is empty, showing progress."""
    from exaconnect.services.queue import queue_status

    ledger_dir = service_ledger(options, stage.service)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(queue, count, stage.name, stop, options, ledger_dir), daemon=True)
    watcher.start()
    last, moved = None, time.monotonic()
    try:
        while True:
            status = queue_status(queue, ledger_dir)
            if status.enqueued == 0 or (control is not None and control.stopping):
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


def _check_dead_letters(stage: Stage, queue: str, ledger_dir: str | None = None) -> None:
    from exaconnect.services.queue import FailureLedger, queue_status

    status = queue_status(queue, ledger_dir)
    if status.failed or status.enqueued:
        ledger = FailureLedger.for_queue(queue, ledger_dir)
        first = ""
        records = ledger.dead_records()
        if records:
            failures = records[0].get("failures") or [{}]
            last_line = str(failures[-1].get("error", "")).strip().splitlines()[-1:] or [""]
            first = f"; first: {last_line[0]}"
        raise StageFailed(f"stage {stage.name}: {status.failed} tasks dead-lettered, {status.enqueued} left on {queue}"
                          f" (see {ledger.dead_letter}){first}")


def _tasks_lost(stage: Stage, queue: str, count: int, options: RunnerOptions) -> bool:
    """A stage to resume whose queue no longer accounts for all its tasks (purged, dead letters
    purged) is enqueued afresh: resuming what is left would record it done with work missing."""
    from exaconnect.services.queue import unaccounted_tasks

    try:
        lost = unaccounted_tasks(queue, count, service_ledger(options, stage.service))
    except ExaconnectError:
        return True  # the queue itself is gone
    if lost:
        log.warning("stage %s: %d of its %d tasks are no longer on %s and were never completed (purged?); "
                    "enqueueing the stage again", stage.name, lost, count, queue)
    return lost > 0


# A worker removes a finished task's file, then appends to the completion tally: a runner that
# looks in between sees one task neither queued nor completed. This long it waits for the tally.
COMPLETION_SETTLE_SECONDS = 10.0


def _check_all_completed(stage: Stage, queue: str, count: int, ledger_dir: str | None = None) -> None:
    """Completion is proved by the queue's own count, not assumed from an empty queue."""
    from exaconnect.services.queue import unaccounted_tasks

    deadline = time.monotonic() + COMPLETION_SETTLE_SECONDS
    lost = unaccounted_tasks(queue, count, ledger_dir)
    while lost and time.monotonic() < deadline:
        time.sleep(0.2)
        lost = unaccounted_tasks(queue, count, ledger_dir)
    if lost:
        raise StageFailed(f"stage {stage.name}: its queue {queue} completed {count - lost} of {count} tasks and no "
                          f"longer holds the other {lost} (purged or deleted while it ran?); rerun to enqueue "
                          "the stage again")


def run_stages(stages: Sequence[Stage], options: RunnerOptions,
               on_complete: Callable[[Stage, StageResult], None] | None = None) -> RunReport:
    """Run `stages` to completion (see the module docstring); returns what each stage did.

    The run holds RECORD/run.lock (`run_lock`), and stops on SIGTERM or Ctrl-C (`StopControl`):
    nothing new starts, running tasks finish or are released, `stopped.json` in the record says
    where it stopped, and RunStopped is raised; the next run resumes there."""
    if options.workers < 0:
        raise InputError(f"--workers {options.workers}: expected 0 (remote workers) or more")
    from exaconnect.services.run_lock import RunLock

    ordered = stage_graph(stages)
    store = ArtifactStore(options.record)
    lock = RunLock(store.root) if options.lock and store.root is not None else None
    if lock is not None:
        lock.acquire()
    outermost = not _ACTIVE
    control = StopControl(options.grace_seconds).install() if outermost else _ACTIVE[0]
    _ACTIVE.append(control)
    try:
        return _run_ordered(ordered, options, store, control, on_complete)
    finally:
        _ACTIVE.pop()
        if outermost:
            control.uninstall()
        if lock is not None:
            lock.release()


def _stopped(control: StopControl, store: ArtifactStore, stage: Stage | None, queue: str | None,
             options: RunnerOptions) -> RunStopped:
    """Release what local workers still held, record where the run stopped, and say so."""
    left = None
    if stage is not None and queue is not None:
        from exaconnect.services.queue import queue_status

        if options.workers > 0:
            try:
                _release_local_leases(queue, service_ledger(options, stage.service))
            except ExaconnectError:
                pass
        try:
            left = queue_status(queue, service_ledger(options, stage.service)).enqueued
        except ExaconnectError:
            pass
    name = signal.Signals(control.signum).name if control.signum else "a stop request"
    where = f"during stage {stage.name} ({left} of its tasks left on {queue})" if stage is not None else \
        "between stages"
    store.put_json("stopped.json", {"signal": name, "stage": stage.name if stage is not None else None,
                                    "tasks_left": left, "queue": queue, "time": time.time(), "pid": os.getpid()})
    return RunStopped(f"stopped by {name} {where}; rerun the same command to resume", control.signum or signal.SIGTERM)


def _tasks_left(stage: Stage, queue: str, options: RunnerOptions) -> bool:
    from exaconnect.services.queue import queue_status

    try:
        return queue_status(queue, service_ledger(options, stage.service)).enqueued > 0
    except ExaconnectError:
        return True


def _outputs_gone(stage: Stage, record: dict) -> str:
    from exaconnect.services.stage_outputs import missing_output

    return missing_output(record.get("outputs") or {})


def _take_back_empty_outputs(stage: Stage, queue: str, ledger_dir: str | None) -> str | None:
    """After a failure: the stage's clean-up of outputs that hold nothing, kept beside the queue's
    dead letters for a requeue to restore. Returns what to add to the error message."""
    from exaconnect.services.queue import FailureLedger

    try:
        taken = stage.after_failure()
        if taken is None:
            return None
        FailureLedger.for_queue(queue, ledger_dir).keep_taken_back(taken.to_dict())
    except Exception as exc:  # the stage's own failure is what the user must see first
        log.warning("stage %s: could not take back its empty outputs: %s", stage.name, exc)
        return None
    return f"{taken.what} (`queue dead-letters requeue` puts it back)"


def _run_ordered(ordered: list, options: RunnerOptions, store: ArtifactStore, control: StopControl,
                 on_complete: Callable[[Stage, StageResult], None] | None) -> RunReport:
    from exaconnect.services.stage_outputs import existing_outputs

    prints: dict[str, str] = {}
    report = RunReport()
    earlier_stop = store.get_json("stopped.json")
    if earlier_stop and options.progress:
        print(f"[run] resuming a run stopped by {earlier_stop.get('signal')} "
              + (f"during stage {earlier_stop['stage']}" if earlier_stop.get("stage") else "between stages"), flush=True)
    for stage in ordered:
        prints[stage.name] = fp = fingerprint(stage, [prints[r.name] for r in stage.requires()])
        queue = service_queue(options.queue_root, stage.service)
        record = store.get_json(_record_key(stage))
        if record is not None and record.get("fingerprint") == fp:
            gone = _outputs_gone(stage, record)
            if not gone:
                result = StageResult(stage.name, "skipped", int(record.get("tasks", 0)), 0.0, fp)
                report.results[stage.name] = result
                log.info("stage %s: complete from an earlier run, skipped", stage.name)
                if options.progress:
                    print(f"[run] {stage.name}: done earlier ({result.tasks} tasks), skipped", flush=True)
                continue
            log.warning("stage %s: complete from an earlier run, but %s; running it again", stage.name, gone)
            print(f"[run] {stage.name}: done earlier, but {gone}; running it again", file=sys.stderr, flush=True)
            store.delete(_record_key(stage))
            store.delete(_enqueued_key(stage))
        if control.stopping:
            raise _stopped(control, store, None, None, options)
        started = time.perf_counter()
        enqueued = store.get_json(_enqueued_key(stage))
        if enqueued is not None and enqueued.get("fingerprint") == fp and \
                not _tasks_lost(stage, queue, int(enqueued["tasks"]), options):
            count = int(enqueued["tasks"])
            log.info("stage %s: resuming its %d tasks on %s", stage.name, count, queue)
            if options.progress:
                print(f"[run] {stage.name}: resuming (enqueued earlier: {count} tasks)", flush=True)
            if options.workers > 0:
                _release_local_leases(queue, service_ledger(options, stage.service))
        else:
            store.delete(_record_key(stage))
            count = _enqueue_stage(stage, queue, options.progress, service_ledger(options, stage.service))
            store.put_json(_enqueued_key(stage), {"fingerprint": fp, "tasks": count, "queue": queue,
                                                  "time": time.time()})
        if count:
            if not control.stopping:
                if options.workers > 0:
                    _drain_locally(stage, queue, count, options, control)
                else:
                    _wait_for_remote(stage, queue, count, options, control)
            if control.stopping and _tasks_left(stage, queue, options):
                raise _stopped(control, store, stage, queue, options)
            try:
                _check_dead_letters(stage, queue, service_ledger(options, stage.service))
                _check_all_completed(stage, queue, count, service_ledger(options, stage.service))
            except StageFailed as failed:
                taken = _take_back_empty_outputs(stage, queue, service_ledger(options, stage.service))
                if taken:
                    raise StageFailed(f"{failed}; {taken}") from None
                raise
        seconds = time.perf_counter() - started
        result = StageResult(stage.name, "done", count, seconds, fp)
        writes = list(stage.writes())
        store.put_json(_record_key(stage), {"fingerprint": fp, "tasks": count, "seconds": seconds,
                                            "finished": time.time(), "reads": list(stage.reads()),
                                            "writes": writes, "outputs": existing_outputs(writes),
                                            "requires": [r.name for r in stage.requires()],
                                            "parameters": stage.parameters()})
        store.delete(_enqueued_key(stage))
        report.results[stage.name] = result
        if options.progress:
            print(f"[run] {stage.name}: {count} tasks in {seconds:.1f}s", flush=True)
        if on_complete is not None:
            on_complete(stage, result)
    if earlier_stop:
        store.delete("stopped.json")
    return report


def forget_stages(record: str, names: Sequence[str]) -> None:
    """Make the named stages run again on the next run (their records are removed)."""
    store = ArtifactStore(record)
    for name in names:
        store.delete(f"stages/{name}.json")
        store.delete(f"stages/{name}.enqueued.json")
