"""A worker: lease a task, run it, delete it; count every lease as an attempt; dead-letter what
cannot succeed; keep leases alive from a separate process; stop cleanly on SIGTERM.

Attempts are counted per lease, not per exception: the lease itself bumps the attempt count in
the task's file name (one rename, no extra file), so a worker that is OOM-killed, segfaults or
calls `os._exit` mid-task has used up an attempt. A task leased for the `max_attempts + 1`-th
time without ever having raised is buried with the reason "worker died while running it" (plus
the signal, when a supervising parent saw it). A task that raises is recorded (traceback) and
handed back after `retry_delay_seconds` (default: the lease time); at `max_attempts` it is buried.
A payload that cannot be turned back into a task (unregistered class, wrong fields, not JSON)
is buried at once with the reason.

Leases are renewed by a small forked "lease keeper" process, not a thread, so a task that holds
the GIL for minutes in a C call cannot starve it. The keeper renews by renaming our own lease file
(`FileQueue.renew`); when that name is gone the lease is no longer ours (it ran out and another
worker took the task), and the keeper tells the worker (SIGUSR1: the task is abandoned at the next
Python bytecode) and, if the worker does not answer within `lost_lease_grace_seconds` because a C
call holds the GIL, kills it, so the task never completes twice concurrently.

Time limits (`task_timeout_seconds`, `queue work --task-timeout`): the keeper also watches how
long the running task has run. Past the limit it tells the worker (SIGUSR2: the task raises
`TaskTimedOut` at the next bytecode and fails as any task does, "timed out after N s"); if the
worker does not answer within `lost_lease_grace_seconds` (a C call holds the GIL, or signals are
blocked), the keeper records the failure itself, kills the worker, and gives the task back to
the queue (or buries it at `max_attempts`). Either way the timeout used up one attempt, so a task
that always hangs ends in the dead letter instead of holding a worker forever.

Exit codes (worker and `--processes` supervisor alike; documented in docs/queue.md):
0 all leased tasks done (or stopped by SIGTERM), 2 bad options or queue, 3 tasks were
dead-lettered, 4 a worker process died (signal or crash) and was replaced, 5 both 3 and 4,
6 workers kept dying and the restart limit was reached.
"""

from __future__ import annotations

import ctypes
import faulthandler
import math
import importlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace

from exaconnect.errors import InputError, QueueError
from exaconnect.services.file_queue import FileQueue, Lease
from exaconnect.services.queue import FailureLedger, open_queue

log = logging.getLogger("exaconnect.worker")

MIN_LEASE_SECONDS = 10
EXIT_OK, EXIT_USAGE, EXIT_DEAD_LETTERED, EXIT_WORKER_DIED, EXIT_BOTH, EXIT_GAVE_UP = 0, 2, 3, 4, 5, 6
HEARTBEAT_SECONDS = 10.0


def register_task_types(extra_modules: tuple[str, ...] = ()) -> None:
    """Import every module that defines tasks so that payloads can be turned back into tasks;
    `extra_modules` lets a lab run its own task classes on the same workers."""
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
    heartbeat: str | None = None  # a file rewritten every 10 s while the worker lives (liveness probes)
    create_queue: bool = False  # make an empty file queue instead of failing when there is none yet
    retry_delay_seconds: float | None = None  # after a failure; None: the lease time
    max_restarts: int = 100  # replacements of dead worker processes per supervisor
    lost_lease_grace_seconds: float = 5.0
    # Longest a task may run (None: no limit); counted as a failed attempt when exceeded.
    task_timeout_seconds: float | None = None
    # Spawned worker processes log at this level: INFO for a worker's own log; WARNING when the
    # stage runner drains a stage locally and shows its progress itself.
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not (isinstance(self.lease_seconds, (int, float)) and self.lease_seconds >= MIN_LEASE_SECONDS):
            raise QueueError(f"--lease-seconds {self.lease_seconds}: must be at least {MIN_LEASE_SECONDS} s "
                             f"(leases are whole seconds and are renewed every third of the lease)")
        if self.max_attempts < 1:
            raise QueueError(f"--max-attempts {self.max_attempts}: must be at least 1")
        if self.max_restarts < 0:
            raise QueueError(f"--max-restarts {self.max_restarts}: must be 0 or more")
        timeout = self.task_timeout_seconds
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise QueueError(f"--task-timeout {timeout}: expected a positive number of seconds")


class _StopRequested(Exception):
    pass


class _LeaseLost(Exception):
    pass


class TaskTimedOut(BaseException):
    """Raised inside a task that ran past its time limit (a BaseException, so that a task's own
    `except Exception` cannot swallow it)."""


def timeout_reason(seconds: float) -> str:
    return f"timed out after {seconds:g} s"


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

    def mark(self, task, state: str, box: list[int] | None | str = "unknown") -> None:
        if box == "unknown":
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


def write_heartbeat(path: str, task: str | None = None, task_started: float | None = None,
                    progress: float | None = None, task_timeout: float | None = None, pid: int | None = None,
                    keep: bool = False) -> None:
    """The liveness file (`--heartbeat`), one JSON object: `time` it was written, the worker's
    `pid`, the `task` it runs and `task_started`, `progress` (when its task loop last moved: leased,
    finished or polled) and its `task_timeout`. The task loop writes it at every step, the lease
    keeper (or the supervisor) every 10 s; deploy/healthcheck.sh fails a worker whose file is old,
    whose task ran past task_timeout or whose progress is older than the probe's limit.

    `keep` (the keeper's beat): only `time` is new; task, task_started and progress stay as the
    worker's task loop last wrote them (the arguments are used when the file has none of this
    worker's). Writers take PATH.lock, so a keeper's beat cannot bring back a task that ended."""
    import fcntl

    pid = pid or os.getpid()
    lock = None
    for _ in range(2):
        try:
            lock = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            break
        except FileNotFoundError:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError:
                return
        except OSError:
            return  # a full or vanished volume must not kill the worker; the probe will notice
    try:
        for _ in range(20):  # a writer holds it for one small write; never wait long for it
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                time.sleep(0.05)
        if keep:
            old = _read_heartbeat(path)
            if old is not None and old.get("pid") == pid:
                task, task_started, progress = old.get("task"), old.get("task_started"), old.get("progress")
        now = time.time()
        record = {"time": round(now, 3), "pid": pid, "task": task or None,
                  "task_started": round(task_started, 3) if task_started else None,
                  "progress": round(progress if progress is not None else now, 3), "task_timeout": task_timeout}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except OSError:
        return
    finally:
        os.close(lock)  # and with it the lock


def _read_heartbeat(path: str) -> dict | None:
    try:
        with open(path) as f:
            record = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def task_loop_beat(options: "WorkerOptions", task: str | None = None, started: float | None = None) -> None:
    """The task loop moved (a lease, a finished task, an empty poll): progress is now."""
    if options.heartbeat:
        write_heartbeat(options.heartbeat, task, started, started, options.task_timeout_seconds)


def _slots_beat(options: "WorkerOptions", slots, pid: int, keeper: bool) -> None:
    """A beat from outside the task loop: the longest-running task of `slots`. A lease keeper keeps
    what its worker's task loop wrote (`keep`); a supervisor, whose workers do not write the file,
    counts the oldest running task's start as the last progress (now when none runs)."""
    running = [(slot.started, slot.task_id) for slot in slots
               if slot.state in (LeaseSlot.RUNNING, LeaseSlot.TIMED_OUT) and slot.task_id]
    started, task = min(running) if running else (None, None)
    write_heartbeat(options.heartbeat, task, started, started, options.task_timeout_seconds, pid, keep=keeper)


# ---------------------------------------------------------------- the lease slot and its keeper

class LeaseSlot:
    """The lease a worker is running, in shared memory: the worker sets and takes it, its lease
    keeper renews it, and a supervising parent reads it to name the task of a worker that died."""

    IDLE, RUNNING, LOST, TIMED_OUT, KILLED = 0, 1, 2, 3, 4

    def __init__(self, context=None) -> None:
        context = context or _fork_context()
        self.lock = context.Lock()
        self._name = context.RawArray(ctypes.c_char, 2048)  # an SQS receipt handle is up to 1,024 bytes
        self._task_id = context.RawArray(ctypes.c_char, 256)
        self._shard = context.RawValue(ctypes.c_int, -1)
        self._attempts = context.RawValue(ctypes.c_int, 0)
        self._state = context.RawValue(ctypes.c_int, 0)
        self._expires = context.RawValue(ctypes.c_double, 0.0)
        self._started = context.RawValue(ctypes.c_double, 0.0)
        # When the lease keeper last went round its loop (it does every half second).
        self._keeper_beat = context.RawValue(ctypes.c_double, 0.0)

    def acquire(self) -> bool:
        # A timeout, so that a keeper killed while holding the lock cannot hang the worker.
        return self.lock.acquire(timeout=5.0)

    def release(self) -> None:
        self.lock.release()

    @property
    def state(self) -> int:
        return self._state.value

    @property
    def task_id(self) -> str:
        return self._task_id.value.decode()

    @property
    def expires(self) -> float:
        return self._expires.value

    @property
    def started(self) -> float:
        return self._started.value

    @property
    def keeper_beat(self) -> float:
        return self._keeper_beat.value

    def keeper_alive(self) -> None:
        self._keeper_beat.value = time.time()

    def lease(self) -> Lease:
        return Lease(self._shard.value, self._name.value.decode(), self.task_id, self._attempts.value, "")

    def put(self, state: int, lease: Lease | None = None, expires: float = 0.0, started: float | None = None) -> None:
        self._state.value = state
        if started is not None:
            self._started.value = started
        if lease is not None:
            self._name.value = lease.name.encode()
            self._task_id.value = lease.task_id.encode()
            self._shard.value = lease.shard
            self._attempts.value = lease.attempts
            self._expires.value = expires


def _fork_context():
    try:
        return multiprocessing.get_context("fork")
    except ValueError:
        return multiprocessing.get_context("spawn")


def _say(message: str) -> None:
    """Log from the keeper without touching logging's or sys.stderr's locks (it is a fork)."""
    os.write(2, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {os.getpid()} lease-keeper: {message}\n".encode())


def _keeper_loop(queue: FileQueue, options: WorkerOptions, slot: LeaseSlot, worker_pid: int,
                 ledger_root: str | None = None) -> None:
    lease_seconds = int(options.lease_seconds)
    renew_before = lease_seconds * 2 / 3  # renew when two thirds of the lease are left
    last_beat = 0.0
    lost_at = None
    timed_out_at = None
    while True:
        slot.keeper_alive()
        if os.getppid() != worker_pid:
            return  # the worker is gone; its lease runs out by itself
        now = time.time()
        if options.heartbeat and now - last_beat >= HEARTBEAT_SECONDS:
            _slots_beat(options, [slot], worker_pid, keeper=True)
            last_beat = now
        notify = timeout_notify = False
        if slot.acquire():
            try:
                state = slot.state
                if state != LeaseSlot.LOST:
                    lost_at = None
                if state != LeaseSlot.TIMED_OUT:
                    timed_out_at = None
                limit = options.task_timeout_seconds
                if state == LeaseSlot.RUNNING and limit is not None and now - slot.started > limit:
                    slot.put(LeaseSlot.TIMED_OUT)
                    state, timed_out_at, timeout_notify = LeaseSlot.TIMED_OUT, now, True
                    task_id = slot.task_id
                elif state == LeaseSlot.TIMED_OUT and timed_out_at is not None and \
                        now - timed_out_at > options.lost_lease_grace_seconds:
                    # The worker did not stop its task: end it here, under the slot lock, so that
                    # the worker cannot meanwhile report the task done or failed.
                    lease = slot.lease()
                    slot.put(LeaseSlot.KILLED)
                    _say(f"task {lease.task_id} {timeout_reason(limit)} and worker {worker_pid} did not stop it "
                         f"within {options.lost_lease_grace_seconds:g} s (a C call holds the GIL?); killing it")
                    os.kill(worker_pid, signal.SIGKILL)
                    _give_back_timed_out(queue, options, lease, ledger_root)
                    return
                if state in (LeaseSlot.RUNNING, LeaseSlot.TIMED_OUT) and slot.expires - now <= renew_before:
                    lease = slot.lease()
                    task_id = lease.task_id
                    renewed = queue.renew(lease, lease_seconds)
                    if renewed is None:
                        slot.put(LeaseSlot.LOST)
                        lost_at, notify, timed_out_at = now, True, None
                    else:
                        slot.put(state, renewed, now + lease_seconds)
            finally:
                slot.release()
        if timeout_notify:
            _say(f"task {task_id} {timeout_reason(options.task_timeout_seconds)}; stopping it in worker {worker_pid}")
            os.kill(worker_pid, signal.SIGUSR2)
        if notify:
            _say(f"lease of task {task_id} was lost (it ran out and another worker took the task); "
                 f"abandoning it in worker {worker_pid}")
            os.kill(worker_pid, signal.SIGUSR1)
        elif lost_at is not None and now - lost_at > options.lost_lease_grace_seconds:
            _say(f"worker {worker_pid} did not abandon task {task_id} within {options.lost_lease_grace_seconds:g} s "
                 f"of losing its lease (a C call holds the GIL?); killing it")
            os.kill(worker_pid, signal.SIGKILL)
            return
        time.sleep(0.5)


def _give_back_timed_out(queue: FileQueue, options: WorkerOptions, lease: Lease, ledger_root: str | None) -> None:
    """After killing a worker whose task ran past its limit: record the attempt, and hand the
    task back for a retry, or bury it when that was its last attempt (the worker cannot)."""
    reason = timeout_reason(options.task_timeout_seconds or 0)
    error = f"TaskTimedOut: {reason} (the task did not stop when told; its worker was killed)"
    try:
        ledger = FailureLedger(ledger_root) if ledger_root else None
        if lease.attempts >= options.max_attempts:
            text = queue.read(lease.task_id) if hasattr(queue, "read") else None
            if ledger is not None:
                ledger.record_failure(lease.task_id, None, error, attempt=lease.attempts)
                ledger.bury(lease.task_id, _payload_or_text(text) if text else None,
                            f"{reason}; failed {lease.attempts} times", lease.attempts)
            queue.delete(lease, tally=False)
            _say(f"task {lease.task_id} moved to the dead letter: {reason}; failed {lease.attempts} times")
        else:
            delay = options.lease_seconds if options.retry_delay_seconds is None else options.retry_delay_seconds
            if ledger is not None:
                ledger.record_failure(lease.task_id, None, error, attempt=lease.attempts, retry_delay=int(delay))
            queue.release(lease, int(delay))
    except Exception as exc:  # the lease then runs out by itself, and the next lease counts the attempt
        _say(f"could not give back timed-out task {lease.task_id}: {exc!r}")


# A keeper silent this long (it beats every half second) is replaced by its worker.
KEEPER_STALL_SECONDS = 30.0


def _start_keeper(queue: FileQueue, options: WorkerOptions, slot: LeaseSlot, ledger_root: str | None = None) -> int:
    worker_pid = os.getpid()
    slot.keeper_alive()  # counts from now, not from an earlier keeper's last beat
    pid = os.fork()
    if pid == 0:  # the keeper
        code = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `with`/finally release the slot lock
            if hasattr(queue, "after_fork"):
                queue.after_fork()
            _keeper_loop(queue, options, slot, worker_pid, ledger_root)
        except SystemExit:
            pass
        except BaseException as exc:  # pragma: no cover - reported, and the worker restarts us
            _say(f"failed: {exc!r}")
            code = 1
        finally:
            os._exit(code)
    return pid


def _stop_keeper(pid: int | None, grace_seconds: float = 5.0) -> None:
    """SIGTERM the keeper and reap it; SIGKILL after `grace_seconds`. A keeper forked while
    another thread of this process held a lock (a test runner's, a library's) can block on it
    forever and never run its SIGTERM handler; waiting on it unbounded hung the worker."""
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_seconds
    try:
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.monotonic() > deadline:
                _say(f"lease keeper {pid} did not stop within {grace_seconds:g} s of SIGTERM; killing it")
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.02)
    except (ProcessLookupError, ChildProcessError):
        pass


def import_task_module(name: str) -> None:
    """Import a `--task-module` (a lab's own task classes); one that cannot be found is named."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
            raise  # the module exists but imports something missing: its own traceback says what
        raise InputError(f"--task-module {name}: no module of that name on the Python path (sys.path); "
                         "give the folder that holds it in PYTHONPATH") from None


# ---------------------------------------------------------------- the worker

class Worker:
    def __init__(self, queue: str, options: WorkerOptions, slot: LeaseSlot | None = None,
                 own_sigterm: bool = True) -> None:
        self.queue_spec = queue
        self.options = options
        self.slot = slot
        # False: the caller (the stage runner, draining a stage in its own process) keeps its
        # SIGTERM handler and calls `request_stop` itself.
        self.own_sigterm = own_sigterm
        self.stopping = False
        self.completed = 0
        self.failed = 0
        self.dead_lettered = 0
        self.abandoned = 0
        self._interruptible = False
        self._builtins_registered = False

    def request_stop(self) -> None:
        """As SIGTERM: the first call finishes the running task and stops; a second one, made while
        a task runs, releases it now (from a signal handler of the thread running the task)."""
        self._on_sigterm(signal.SIGTERM, None)

    def _on_sigterm(self, signum, frame) -> None:
        if self.stopping and self._interruptible:
            # A second SIGTERM: give the task back now rather than finishing it.
            self._interruptible = False
            raise _StopRequested()
        self.stopping = True
        log.warning("SIGTERM: finishing the current task, then exiting (send again to release it now)")

    def _on_lease_lost(self, signum, frame) -> None:
        if self._interruptible:
            self._interruptible = False
            raise _LeaseLost()

    def _on_timeout(self, signum, frame) -> None:
        if self._interruptible:
            self._interruptible = False
            raise TaskTimedOut(timeout_reason(self.options.task_timeout_seconds or 0))

    def run(self) -> int:
        try:
            faulthandler.enable()  # a segfault in a decoder leaves the Python stack in the log
        except (OSError, ValueError, AttributeError):  # stderr without a file descriptor (captured in tests)
            pass
        # Every chunk this worker's tasks decode is checked before a C decoder sees it, whichever
        # task classes are loaded (and however early): a garbled chunk fails its task by name.
        from exaconnect.precomputed.chunks import install_chunk_guard

        install_chunk_guard()
        # Mips that igneous's DownsampleTask derives get checksum manifests, as our tasks' output does.
        from exaconnect.precomputed.checksums import checksum_downsample_output

        checksum_downsample_output()
        for name in self.options.task_modules:
            import_task_module(name)
        queue = open_queue(self.queue_spec, create=self.options.create_queue)
        if not isinstance(queue, FileQueue):
            from exaconnect.services.sqs_queue import SQSQueue

            queue = SQSQueue(queue)
        ledger = FailureLedger.for_queue(self.queue_spec, self.options.ledger_dir)
        self.boxes = TaskBoxes(ledger.root)
        slot = self.slot or LeaseSlot()
        task_loop_beat(self.options)
        self._ledger_root = str(ledger.root)
        keeper = _start_keeper(queue, self.options, slot, self._ledger_root)
        handlers = [(signal.SIGUSR1, self._on_lease_lost), (signal.SIGUSR2, self._on_timeout)]
        if self.own_sigterm:
            handlers.append((signal.SIGTERM, self._on_sigterm))
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers}
        idle = 0
        try:
            while not self.stopping:
                if self.options.max_tasks is not None and self.completed + self.failed + self.dead_lettered + self.abandoned >= self.options.max_tasks:
                    break
                keeper = self._check_keeper(keeper, queue, slot)
                lease = queue.lease(int(self.options.lease_seconds))
                if lease is None:
                    task_loop_beat(self.options)  # an empty poll is progress too
                    if self.options.exit_when_empty and queue.is_empty():
                        break
                    time.sleep(self._idle_sleep(idle))
                    idle += 1
                    continue
                idle = 0
                self._run_one(queue, ledger, slot, lease)
        finally:
            _stop_keeper(keeper)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("worker done: %d completed, %d failed attempts, %d dead-lettered",
                 self.completed, self.failed, self.dead_lettered)
        return EXIT_DEAD_LETTERED if self.dead_lettered else EXIT_OK

    def _idle_sleep(self, idle: int) -> float:
        """Back off while the queue has nothing for us: each empty pass lists every shard, and
        thousands of idle workers polling at a fixed short interval would be a metadata storm of
        their own at the end of a batch. Doubling, capped at a quarter lease (at most 30 s), jittered."""
        import random

        base = self.options.idle_poll_seconds
        cap = max(base, min(30.0, self.options.lease_seconds / 4))
        return min(cap, base * 2 ** min(idle, 16)) * random.uniform(0.5, 1.0)

    def _check_keeper(self, keeper: int, queue: FileQueue, slot: LeaseSlot) -> int:
        try:
            done, status = os.waitpid(keeper, os.WNOHANG)
        except ChildProcessError:
            done, status = keeper, 0
        if done == 0:
            silent = time.time() - slot.keeper_beat
            if silent < KEEPER_STALL_SECONDS:
                return keeper
            # Forked while another thread held a lock, a keeper can block on it for good: its
            # leases would run out under running tasks. Replace it.
            log.error("lease keeper %d has not gone round its loop for %.0f s; replacing it", keeper, silent)
            _stop_keeper(keeper, grace_seconds=0.0)
        else:
            log.error("lease keeper %d exited (status %d); starting a new one", keeper, status)
        return _start_keeper(queue, self.options, slot, self._ledger_root)

    def _build(self, lease: Lease):
        """(task, payload) from the lease's text, registering our task modules on first need."""
        from taskqueue.queueables import totask

        body = json.loads(lease.text)
        payload = body["payload"] if isinstance(body, dict) and "payload" in body else body
        try:
            return totask({"payload": json.loads(json.dumps(payload)), "id": lease.task_id}), payload
        except Exception:
            if self._builtins_registered:
                raise
            self._builtins_registered = True
            register_task_types()
            return totask({"payload": json.loads(json.dumps(payload)), "id": lease.task_id}), payload

    def _bury(self, queue: FileQueue, ledger: FailureLedger, lease: Lease, payload, reason: str, attempts: int) -> None:
        path = ledger.bury(lease.task_id, payload, reason, attempts)
        queue.delete(lease, tally=False)
        self.dead_lettered += 1
        log.error("task %s moved to dead letter %s: %s", lease.task_id, path, reason)

    def _run_one(self, queue: FileQueue, ledger: FailureLedger, slot: LeaseSlot, lease: Lease) -> None:
        task_id, max_attempts = lease.task_id, self.options.max_attempts
        if lease.attempts > max_attempts:
            # Every earlier lease ended without a result and without an exception: the worker died.
            deaths = [f for f in ledger.errors(task_id) if f.get("kind") == "died"]
            how = deaths[-1].get("signal", "") if deaths else ""
            reason = "worker died while running it" + (f" ({how})" if how else "")
            payload = _payload_or_text(lease.text)
            self._bury(queue, ledger, lease, payload, f"{reason}; {max_attempts} leases used", lease.attempts - 1)
            return
        try:
            task, payload = self._build(lease)
        except Exception as exc:
            self._bury(queue, ledger, lease, _payload_or_text(lease.text),
                       f"cannot rebuild the task: {type(exc).__name__}: {exc} (is its module imported with --task-module, "
                       f"and is this worker the same version as the enqueuer?)", lease.attempts)
            return
        key = getattr(task, "key", None)
        # igneous tasks carry a tuple key; ours a string (joining a string would split it per character)
        name = type(task).__name__ if key is None else (key if isinstance(key, str) else ".".join(map(str, key)))
        try:
            box = task_box(task)
        except Exception:
            box = None
        if slot.acquire():
            expires = lease.expires if lease.shard >= 0 else time.time() + self.options.lease_seconds
            slot.put(LeaseSlot.RUNNING, lease, expires, started=time.time())
            slot.release()
        log.info("task %s (%s, box %s) started, attempt %d/%d", task_id, name, box, lease.attempts, max_attempts)
        self.boxes.mark(task, "running", box)
        started = time.time()
        task_loop_beat(self.options, task_id, started)
        outcome, error = "done", ""
        try:
            self._interruptible = True
            task.execute()
            self._interruptible = False
        except (_StopRequested, KeyboardInterrupt):
            outcome = "released"
        except _LeaseLost:
            outcome = "lost"
        except TaskTimedOut:
            outcome, error = "failed", traceback.format_exc()
        except Exception:
            self._interruptible = False
            outcome, error = "failed", traceback.format_exc()
        finally:
            self._interruptible = False
            state, current = LeaseSlot.RUNNING, lease
            if slot.acquire():
                state, current = slot.state, slot.lease()
                slot.put(LeaseSlot.IDLE)
                slot.release()
            task_loop_beat(self.options)
        lease = replace(lease, name=current.name or lease.name)
        if state == LeaseSlot.LOST or outcome == "lost":
            self.abandoned += 1
            self.boxes.mark(task, "pending", box)
            log.warning("task %s (%s) abandoned: its lease was lost to another worker (%s)", task_id, name,
                        "it had finished; outputs are idempotent" if outcome == "done" else "stopped mid-task")
            return
        if outcome == "released":
            queue.release(lease, 0, refund=True)
            self.boxes.mark(task, "pending", box)
            self.stopping = True
            log.warning("released task %s (%s) on a second SIGTERM or Ctrl-C", task_id, name)
            return
        if outcome == "failed":
            self.failed += 1
            delay = self.options.lease_seconds if self.options.retry_delay_seconds is None else self.options.retry_delay_seconds
            retry = lease.attempts < max_attempts
            ledger.record_failure(task_id, payload, error, attempt=lease.attempts, retry_delay=int(delay) if retry else None)
            log.error("task %s (%s) failed, attempt %d/%d:\n%s", task_id, name, lease.attempts, max_attempts, error)
            if lease.attempts >= max_attempts:
                self.boxes.mark(task, "failed", box)
                last = error.strip().splitlines()[-1] if error.strip() else "failed"
                self._bury(queue, ledger, lease, payload, f"{last}; failed {lease.attempts} times", lease.attempts)
            else:
                self.boxes.mark(task, "pending", box)
                queue.release(lease, int(delay))
            return
        self.boxes.mark(task, "done", box)
        if not queue.delete(lease, tally=True):
            log.warning("task %s (%s) finished but its lease had run out; deleted it anyway", task_id, name)
        if lease.attempts > 1:
            ledger.forget(task_id)  # only a retried task can have failure records
        self.completed += 1
        log.info("task %s (%s) done in %.2fs", task_id, name, time.time() - started)


def _payload_or_text(text: str):
    try:
        body = json.loads(text)
    except ValueError:
        return text
    return body.get("payload", body) if isinstance(body, dict) else body


# ---------------------------------------------------------------- supervised processes

def _worker_process(queue: str, options: WorkerOptions, slot: LeaseSlot) -> None:
    logging.basicConfig(level=getattr(logging, options.log_level, logging.INFO),
                        format="%(asctime)s %(process)d %(levelname)s %(message)s")
    try:
        code = Worker(queue, options, slot).run()
    except QueueError as exc:
        log.error("%s", exc)
        code = EXIT_USAGE
    sys.exit(code)


def _how(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def run_workers(queue: str, options: WorkerOptions, processes: int = 1, supervise: bool = False,
                stop_requests=None) -> int:
    """Run one worker here, or `processes` supervised workers as separate processes (spawned, not
    forked, because TensorFlow and thread pools do not survive fork); `supervise` runs even a
    single worker as a child (a keeper that ends a hung task kills its worker, which must then not
    be the caller's own process). A worker process that dies
    (a signal, or a crash) is logged with the signal and the task it was running, the task's
    failure ledger gets the death, and the process is replaced, up to `options.max_restarts`
    times. Returns an exit code (see the module docstring).

    `stop_requests` (the stage runner's): a function returning how many stops were asked for so
    far; the supervisor then leaves SIGTERM to its caller and polls it: 1 tells each worker to
    finish its task and exit, 2 to release it now, 3 kills the workers (a task deaf to both)."""
    if processes < 1:
        raise QueueError(f"--processes {processes}: must be at least 1")
    if processes == 1 and not supervise:
        return Worker(queue, options).run()
    from multiprocessing.connection import wait

    open_queue(queue, create=options.create_queue)  # fail here, once, not in every child
    ledger = FailureLedger.for_queue(queue, options.ledger_dir)
    context = multiprocessing.get_context("spawn")
    children: dict = {}

    def start() -> None:
        slot = LeaseSlot(context)
        # the supervisor alone writes the heartbeat, from every worker's slot (_slots_beat)
        child = context.Process(target=_worker_process, args=(queue, replace(options, heartbeat=None), slot))
        child.start()
        children[child.sentinel] = (child, slot)

    for _ in range(processes):
        start()
    stopping = False

    def forward(signum, frame):
        nonlocal stopping
        stopping = True
        for child, _ in list(children.values()):
            if child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward) if stop_requests is None else None
    restarts = died = 0
    dead_lettered = gave_up = False
    last_beat = 0.0
    stops_sent = 0
    try:
        while children:
            if options.heartbeat and time.time() - last_beat >= HEARTBEAT_SECONDS:
                _slots_beat(options, [slot for _, slot in children.values()], os.getpid(), keeper=False)
                last_beat = time.time()
            if stop_requests is not None:
                wanted = stop_requests()
                while stops_sent < wanted:
                    stops_sent += 1
                    stopping = True
                    for child, _ in list(children.values()):
                        if child.is_alive():
                            os.kill(child.pid, signal.SIGTERM if stops_sent < 3 else signal.SIGKILL)
            for sentinel in wait(list(children), timeout=1.0 if stop_requests is None else 0.2):
                child, slot = children.pop(sentinel)
                child.join()
                code = child.exitcode
                if code in (EXIT_OK, EXIT_DEAD_LETTERED):
                    dead_lettered |= code == EXIT_DEAD_LETTERED
                    continue
                if code == EXIT_USAGE:
                    log.error("worker %d stopped: bad options or queue (exit code 2)", child.pid)
                    gave_up = True
                    continue
                died += 1
                if slot.state == LeaseSlot.KILLED and slot.task_id:
                    # Its keeper ended it for running past --task-timeout, and recorded that itself.
                    log.error("worker %d was killed by its lease keeper: task %s %s", child.pid, slot.task_id,
                              timeout_reason(options.task_timeout_seconds or 0))
                    dead_lettered |= bool(ledger.dead_letter.joinpath(f"{slot.task_id}.json").exists())
                elif slot.state in (LeaseSlot.RUNNING, LeaseSlot.TIMED_OUT) and slot.task_id:
                    task_id = slot.task_id
                    ledger.record_death(task_id, _how(code), child.pid)
                    log.error("worker %d died (%s) while running task %s", child.pid, _how(code), task_id)
                else:
                    log.error("worker %d died (%s) between tasks", child.pid, _how(code))
                if stopping:
                    continue
                if restarts < options.max_restarts:
                    restarts += 1
                    log.warning("starting a replacement worker (restart %d of at most %d)", restarts, options.max_restarts)
                    start()
                else:
                    gave_up = True
                    log.error("restart limit %d reached; not replacing worker %d", options.max_restarts, child.pid)
    except KeyboardInterrupt:
        # Ctrl-C reached the children too; stop replacing them and wait for them to go.
        stopping = True
        for child, _ in list(children.values()):
            child.join(30)
            if child.is_alive():
                child.terminate()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if gave_up:
        return EXIT_GAVE_UP
    if died:
        return EXIT_BOTH if dead_lettered else EXIT_WORKER_DIED
    return EXIT_DEAD_LETTERED if dead_lettered else EXIT_OK
