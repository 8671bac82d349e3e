"""The shared task queue: a sharded file queue (`services/file_queue.py`) for paths and `fq://`
URLs (it needs nothing but a shared filesystem, as on Aurora's Lustre/DAOS), SQS URLs passed
through to python-task-queue.

Task-queue leases, deletes and counts completions; it has no notion of a failed task. We add a
small failure ledger beside the queue: every failure of a task (its traceback, or the signal that
killed its worker) is recorded under its id, and a task that has used `max_attempts` leases is
moved to a dead-letter record (payload, reason, every failure) and deleted, so one bad chunk
cannot stall a run. `exaconnect queue dead-letters` lists, shows, requeues and purges them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from exaconnect.errors import QueueError

log = logging.getLogger(__name__)


def queue_url(spec: str) -> str:
    """A plain path becomes `fq://ABSPATH`; `fq://`, `sqs://` and `https://sqs...` pass through."""
    text = str(spec)
    if text.startswith("fq://"):
        return "fq://" + os.path.abspath(text[len("fq://") :])
    if text.startswith(("sqs://", "https://", "http://", "mem://")):
        return text
    if "://" in text:
        raise QueueError(f"queue {text}: unsupported protocol; expected fq://PATH, a path, or an SQS URL")
    return "fq://" + os.path.abspath(text)


def queue_path(spec: str) -> Path | None:
    """The folder of a file queue, None for other queues."""
    url = queue_url(spec)
    return Path(url[len("fq://") :]) if url.startswith("fq://") else None


def open_queue(spec: str, create: bool = True, shards: int | None = None):
    """The queue named by `spec`: a `FileQueue` for a file queue, python-task-queue's TaskQueue
    otherwise. With `create=False` a file queue must already exist, and we say so clearly."""
    from exaconnect.services.file_queue import DEFAULT_SHARDS, FileQueue, is_file_queue

    url = queue_url(spec)
    path = queue_path(spec)
    if path is None:
        from taskqueue import TaskQueue

        return TaskQueue(url, progress=False)
    if not is_file_queue(path):
        if (path / "queue").is_dir() and any((path / "queue").glob("*.json")):
            raise QueueError(f"queue {url} has python-task-queue's flat layout (tasks in {path / 'queue'}); "
                             f"drain it with an older exaconnect or purge it with `ptq purge {url}`")
        if not create:
            raise QueueError(f"queue {url} does not exist (no {path / 'layout.json'}); enqueue tasks first, "
                             f"or start workers with --create-queue")
    try:
        return FileQueue(path, create=create, shards=shards or DEFAULT_SHARDS)
    except (OSError, ValueError) as exc:
        raise QueueError(f"queue {url}: {exc}") from None


class FailureLedger:
    """Per-task failure records and the dead-letter store, kept as JSON files in a folder.

    For a file queue the folder lives inside the queue directory, so every worker on the shared
    filesystem sees the same records. For SQS, pass a shared folder (or use SQS's own redrive
    policy, which this mirrors). Only failures write here; a task that succeeds first time costs
    no ledger file.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.failures = self.root / "failures"
        self.dead_letter = self.root / "dead-letter"

    @classmethod
    def for_queue(cls, spec: str, ledger_dir: str | None = None) -> "FailureLedger":
        url = queue_url(spec)
        if ledger_dir:
            return cls(ledger_dir)
        if url.startswith("fq://"):
            return cls(url[len("fq://") :])
        safe = "".join(c if c.isalnum() else "_" for c in url)[-80:]
        return cls(Path("queues") / f"{safe}-ledger")

    def _append(self, task_id: str, record: dict) -> int:
        self.failures.mkdir(parents=True, exist_ok=True)
        path = self.failures / f"{task_id}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")
        with open(path) as f:
            return sum(1 for _ in f)

    def record_failure(self, task_id: str, payload: dict | None, error: str, attempt: int | None = None,
                       retry_delay: int | None = None) -> int:
        """Append one failed attempt (a traceback); returns how many failures are recorded.
        `retry_delay`: the task is handed back to wait this long before its next lease (which
        lets `queue status` tell a task waiting out its delay from one a worker holds)."""
        record = {"kind": "exception", "attempt": attempt, "error": error}
        if retry_delay is not None:
            record["retry_delay"] = int(retry_delay)
        return self._append(task_id, record)

    def record_death(self, task_id: str, how: str, pid: int | None = None) -> int:
        """A worker died while running the task (seen by its parent: `how` names the signal)."""
        return self._append(task_id, {"kind": "died", "pid": pid, "signal": how,
                                      "error": f"worker {pid} died while running it ({how})"})

    def errors(self, task_id: str) -> list[dict]:
        path = self.failures / f"{task_id}.jsonl"
        if not path.exists():
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def bury(self, task_id: str, payload, reason: str | None = None, attempts: int | None = None) -> Path:
        """Write the dead-letter record (atomically; then the caller deletes the task)."""
        self.dead_letter.mkdir(parents=True, exist_ok=True)
        failures = self.errors(task_id)
        record = {"id": task_id, "reason": reason or (failures[-1]["error"].strip().splitlines()[-1] if failures else "unknown"),
                  "attempts": attempts, "time": time.time(), "payload": payload, "failures": failures}
        final = self.dead_letter / f"{task_id}.json"
        tmp = self.dead_letter / f".{task_id}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, final)
        self.forget(task_id)
        return final

    def forget(self, task_id: str) -> None:
        (self.failures / f"{task_id}.jsonl").unlink(missing_ok=True)

    def dead_ids(self) -> set[str]:
        if not self.dead_letter.exists():
            return set()
        return {p.stem for p in self.dead_letter.glob("*.json")}

    def failing_ids(self) -> set[str]:
        if not self.failures.exists():
            return set()
        return {p.stem for p in self.failures.glob("*.jsonl")} - self.dead_ids()

    def dead_count(self) -> int:
        return len(self.dead_ids())

    def failing_count(self) -> int:
        return len(self.failing_ids())

    def dead_records(self) -> list[dict]:
        if not self.dead_letter.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dead_letter.glob("*.json"))]

    def dead_record(self, task_id: str) -> dict:
        path = self.dead_letter / f"{task_id}.json"
        if not path.is_file():
            raise QueueError(f"no dead-lettered task {task_id} in {self.dead_letter}")
        return json.loads(path.read_text())

    def drop(self, task_id: str) -> None:
        (self.dead_letter / f"{task_id}.json").unlink(missing_ok=True)
        self.forget(task_id)

    # What a failed stage's clean-up took from its outputs (precomputed/empty_outputs.py), kept
    # beside the dead letters that were made for it: a requeue puts it back, a purge forgets it.
    @property
    def _taken_back_path(self) -> Path:
        return self.dead_letter / "taken-back.jsonl"

    def keep_taken_back(self, record: dict) -> None:
        self.dead_letter.mkdir(parents=True, exist_ok=True)
        with open(self._taken_back_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def taken_back(self) -> list[dict]:
        if not self._taken_back_path.exists():
            return []
        return [json.loads(line) for line in self._taken_back_path.read_text().splitlines() if line.strip()]

    def forget_taken_back(self) -> None:
        self._taken_back_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class QueueStatus:
    inserted: int
    enqueued: int
    leased: int
    completed: int
    failed: int
    retrying: int
    waiting: int = 0  # failed tasks waiting out their retry delay (not held by any worker)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def queue_status(spec: str, ledger_dir: str | None = None) -> QueueStatus:
    """Counts for `exaconnect queue status`. `failed`: dead-lettered tasks. `retrying`: tasks still
    in the queue that already failed or lost a worker (a dead-lettered task is never retrying).
    `leased`: tasks a worker holds now; `waiting`: failed tasks handed back to wait out their retry
    delay (both kinds are hidden from workers until a time; the failure record tells them apart)."""
    from exaconnect.services.file_queue import FileQueue

    q = open_queue(spec, create=False)
    ledger = FailureLedger.for_queue(spec, ledger_dir)
    dead = ledger.dead_ids()
    if not isinstance(q, FileQueue):
        return QueueStatus(int(q.inserted), int(q.enqueued), int(q.leased), int(q.completed), len(dead),
                           ledger.failing_count())
    now = int(time.time())
    failing = ledger.failing_ids()
    enqueued = leased = retrying = waiting = 0
    for _, ts, ident, attempts in q.entries():
        enqueued += 1
        if ts > now:
            if ident in failing and waiting_out_retry_delay(ledger, ident, ts):
                waiting += 1
            else:
                leased += 1
        if ident not in dead and (attempts >= 2 or ident in failing or (attempts == 1 and ts <= now)):
            retrying += 1
    return QueueStatus(q.inserted, enqueued, leased, q.completed, len(dead), retrying, waiting)


def waiting_out_retry_delay(ledger: FailureLedger, task_id: str, hidden_until: int) -> bool:
    """A task handed back after a failure at time F with delay D is hidden until F + D; leased
    again after that, it is hidden until a lease (at least 10 s) beyond F + D."""
    errors = ledger.errors(task_id)
    last = errors[-1] if errors else {}
    if "retry_delay" not in last:
        return False
    return hidden_until <= float(last["time"]) + int(last["retry_delay"]) + 2


def enqueue(spec: str, tasks, total: int | None = None, description: str = "enqueue") -> int:
    """Insert tasks with a progress bar; returns how many were inserted."""
    from tqdm import tqdm

    tq = open_queue(spec)
    tasks = list(tasks) if total is None else tasks
    total = len(tasks) if total is None else total
    count = 0
    batch: list = []
    with tqdm(total=total, desc=f"{description} -> {queue_url(spec)}", unit="task", disable=None) as bar:
        for task in tasks:
            batch.append(task)
            if len(batch) >= 500:
                count += tq.insert(batch, parallel=1)
                bar.update(len(batch))
                batch = []
        if batch:
            count += tq.insert(batch, parallel=1)
            bar.update(len(batch))
    return count


def purge_queue(spec: str, ledger_dir: str | None = None, dead_letters: bool = False) -> int:
    """Delete every task, the counters and the failure records; dead letters too when asked.
    Returns how many tasks were deleted."""
    q = open_queue(spec, create=False)
    count = int(q.enqueued)
    q.purge()
    ledger = FailureLedger.for_queue(spec, ledger_dir)
    for p in ledger.failures.glob("*.jsonl") if ledger.failures.exists() else ():
        p.unlink(missing_ok=True)
    if dead_letters:
        purge_dead_letters(spec, ledger_dir)
    return count


def requeue_dead_letters(spec: str, task_ids: list[str] | None = None, ledger_dir: str | None = None) -> int:
    """Put dead-lettered tasks back on the queue under their own ids, with no attempts used and
    no failures on record (`task_ids=None`: all of them). Returns how many."""
    from exaconnect.services.file_queue import FileQueue

    q = open_queue(spec, create=False)
    ledger = FailureLedger.for_queue(spec, ledger_dir)
    ids = sorted(ledger.dead_ids()) if task_ids is None else task_ids
    records = {task_id: ledger.dead_record(task_id) for task_id in ids}  # every id exists before anything changes
    if records:
        _put_back_taken(ledger)
    count = 0
    for task_id, record in records.items():
        payload = record.get("payload")
        # A registered task's payload is a dict; a function task's (igneous's DownsampleTask, a
        # partial) is a list. Text is what could not be parsed when the task was buried.
        if not isinstance(payload, (dict, list)):
            raise QueueError(f"dead-lettered task {task_id}: its payload is not a task (not JSON), cannot requeue it")
        if isinstance(q, FileQueue):
            q.delete_id(task_id)  # in case it was buried between its record and its delete
            q.insert([payload], task_id=task_id)
        else:
            q.insert([payload])
        ledger.drop(task_id)
        count += 1
    return count


def unaccounted_tasks(spec: str, expected: int, ledger_dir: str | None = None) -> int:
    """How many of the `expected` tasks a stage enqueued are neither completed, nor still on the
    queue, nor dead-lettered: tasks purged or deleted without running. Only a file queue keeps
    the counts this needs (SQS: 0, nothing is proved there).

    A task counts as completed once, when its worker deletes it (a task finished twice after a
    lost lease is tallied by the first delete only), and a requeued dead letter is inserted
    again, so `completed + enqueued + dead >= expected` holds exactly when nothing was lost."""
    from exaconnect.services.file_queue import FileQueue

    q = open_queue(spec, create=False)
    if not isinstance(q, FileQueue):
        return 0
    dead = FailureLedger.for_queue(spec, ledger_dir).dead_count()
    return max(0, int(expected) - q.completed - q.enqueued - dead)


def purge_dead_letters(spec: str, ledger_dir: str | None = None) -> int:
    ledger = FailureLedger.for_queue(spec, ledger_dir)
    ids = ledger.dead_ids()
    for task_id in ids:
        ledger.drop(task_id)
    ledger.forget_taken_back()
    return len(ids)


def _put_back_taken(ledger: FailureLedger) -> None:
    """Restore the outputs' structure the failed stage's clean-up took back (the scales, the info
    the requeued tasks were made for) before they can run again."""
    from exaconnect.precomputed.empty_outputs import TakenBack, restore

    for record in ledger.taken_back():
        taken = TakenBack.from_dict(record)
        if not restore(taken):
            log.warning("%s was rewritten since the failed stage's clean-up (%s): left as it is now", taken.url, taken.what)
    ledger.forget_taken_back()
