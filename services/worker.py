"""A worker: lease a task, run it, delete it; record failures; stop cleanly on SIGTERM.

Failed tasks are not released: the lease simply runs out and the task comes back, which spaces
retries by the lease time (a crashed node behaves the same way). After `max_attempts` failures
the task goes to the dead-letter record and is deleted.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
import traceback
from dataclasses import dataclass

from exaconnect.services.queue import FailureLedger, open_queue

log = logging.getLogger("exaconnect.worker")


def register_task_types(extra_modules: tuple[str, ...] = ()) -> None:
    """Import every module that defines tasks so that payloads can be turned back into tasks;
    `extra_modules` lets a lab run its own task classes on the same workers."""
    import importlib

    import igneous.tasks  # noqa: F401  (downsample, mesh, skeleton task classes)

    from exaconnect.services import registry  # noqa: F401

    for name in extra_modules:
        importlib.import_module(name)


@dataclass(frozen=True)
class WorkerOptions:
    lease_seconds: int = 600
    exit_when_empty: bool = False
    max_attempts: int = 3
    idle_poll_seconds: float = 2.0
    ledger_dir: str | None = None
    max_tasks: int | None = None
    task_modules: tuple[str, ...] = ()


class _StopRequested(Exception):
    pass


def task_box(task) -> list[int] | None:
    """The mip-0 box a task works on, when it says: our tasks through `box()`, igneous's through
    their `offset` and `shape` fields. Used only to show progress in the viewer."""
    if hasattr(task, "box") and callable(task.box):
        box = task.box()
        return None if box is None else list(box.to_list())
    payload = task.payload()
    fields = payload[2] if isinstance(payload, list) and len(payload) > 2 else payload
    if isinstance(fields, dict) and "offset" in fields and "shape" in fields:
        try:
            offset = [int(v) for v in fields["offset"]][:3]
            shape = [int(v) for v in fields["shape"]][:3]
        except (TypeError, ValueError):
            return None
        if fields.get("mip", 0) not in (0, None):
            return None  # boxes of higher mips are in other coordinates
        return offset + [o + s for o, s in zip(offset, shape)]
    return None


class TaskBoxes:
    """Per-task state files under QUEUE/boxes/ for `exaconnect view --tasks QUEUE/boxes`."""

    def __init__(self, root) -> None:
        from pathlib import Path

        self.root = Path(root) / "boxes"

    def mark(self, task, state: str) -> None:
        import json
        import os

        try:
            box = task_box(task)
        except Exception:
            box = None
        if box is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{task.id}.json"
        tmp = self.root / f".{task.id}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"bbox": box, "state": state}))
        os.replace(tmp, final)


class Worker:
    def __init__(self, queue: str, options: WorkerOptions) -> None:
        self.queue_spec = queue
        self.options = options
        self.stopping = False
        self.completed = 0
        self.failed = 0
        self._interruptible = False

    def _on_sigterm(self, signum, frame) -> None:
        if self.stopping and self._interruptible:
            # A second SIGTERM: give the task back now rather than finishing it.
            raise _StopRequested()
        self.stopping = True
        log.warning("SIGTERM: finishing the current task, then exiting (send again to release it now)")

    def run(self) -> int:
        from taskqueue import QueueEmptyError

        register_task_types(self.options.task_modules)
        tq = open_queue(self.queue_spec, create=False)
        ledger = FailureLedger.for_queue(self.queue_spec, self.options.ledger_dir)
        self.boxes = TaskBoxes(ledger.root)
        self._current = None
        stopped = threading.Event()
        if self.options.lease_seconds > 0:
            threading.Thread(target=self._keep_leases, args=(tq, stopped), daemon=True).start()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while not self.stopping:
                if self.options.max_tasks is not None and self.completed + self.failed >= self.options.max_tasks:
                    break
                try:
                    task = tq.lease(seconds=self.options.lease_seconds)
                except QueueEmptyError:
                    if self.options.exit_when_empty and tq.is_empty():
                        break
                    time.sleep(self.options.idle_poll_seconds)
                    continue
                self._run_one(tq, ledger, task)
        finally:
            stopped.set()
            signal.signal(signal.SIGTERM, previous)
        log.info("worker done: %d completed, %d failed attempts", self.completed, self.failed)
        return 0

    def _keep_leases(self, tq, stopped: threading.Event) -> None:
        """Renew the current task's lease at half its length, so a long FFN subvolume is not
        handed to a second worker; if this process dies, renewals stop and the lease runs out.
        One thread per worker, not per task: per-task threads cost ~10 ms each."""
        interval = max(1.0, self.options.lease_seconds / 2)
        while not stopped.wait(interval):
            task = self._current
            if task is None:
                continue
            try:
                tq.renew(task, self.options.lease_seconds)
            except Exception as exc:  # a missed renewal only risks a duplicate run, which is harmless
                log.warning("could not renew lease of task %s: %s", task.id, exc)

    def _run_one(self, tq, ledger: FailureLedger, task) -> None:
        task_id = str(task.id)
        name = type(task).__name__ if not hasattr(task, "key") else ".".join(task.key)
        started = time.time()
        self._interruptible = True
        self.boxes.mark(task, "running")
        self._current = task
        try:
            task.execute()
        except _StopRequested:
            tq.cancel(task)
            log.warning("released task %s (%s) on second SIGTERM", task_id, name)
            self.stopping = True
            return
        except Exception:
            self.failed += 1
            error = traceback.format_exc()
            attempts = ledger.record_failure(task_id, task.payload(), error)
            log.error("task %s (%s) failed, attempt %d/%d:\n%s", task_id, name, attempts, self.options.max_attempts, error)
            self.boxes.mark(task, "pending")
            if attempts >= self.options.max_attempts:
                path = ledger.bury(task_id, task.payload())
                self.boxes.mark(task, "failed")
                tq.delete(task)
                log.error("task %s moved to dead letter %s after %d attempts", task_id, path, attempts)
            return
        finally:
            self._interruptible = False
            self._current = None
        self.boxes.mark(task, "done")
        tq.delete(task, tally=True)
        ledger.forget(task_id)
        self.completed += 1
        log.info("task %s (%s) done in %.2fs", task_id, name, time.time() - started)


def _worker_process(queue: str, options: WorkerOptions) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s")
    return Worker(queue, options).run()


def run_workers(queue: str, options: WorkerOptions, processes: int = 1) -> int:
    """Run one worker here, or `processes` workers as separate processes (spawned, not forked,
    because TensorFlow and thread pools do not survive fork)."""
    if processes <= 1:
        return Worker(queue, options).run()
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_worker_process, args=(queue, options)) for _ in range(processes)]
    for child in children:
        child.start()

    def forward(signum, frame):
        for child in children:
            if child.is_alive():
                child.terminate()

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for child in children:
            child.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return max((child.exitcode or 0) for child in children)
