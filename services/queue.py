"""The shared task queue: python-task-queue's `fq://` file queue by default (it needs nothing
but a shared filesystem, as on Aurora's Lustre/DAOS), SQS URLs passed through.

task-queue leases, deletes and counts completions; it has no notion of a failed task. We add a
small failure ledger beside the queue: each failure of a task is recorded under its id, and a
task that has failed `max_attempts` times is moved to a dead-letter record (task payload plus
every traceback) and deleted, so one bad chunk cannot stall a run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from exaconnect.errors import QueueError


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


def open_queue(spec: str, create: bool = True):
    """A TaskQueue for `spec`; for a file queue that must already exist, say so clearly."""
    from taskqueue import TaskQueue

    url = queue_url(spec)
    if url.startswith("fq://") and not create:
        path = Path(url[len("fq://") :])
        if not (path / "queue").is_dir():
            raise QueueError(f"queue {url} does not exist (no {path / 'queue'}); enqueue tasks first")
    return TaskQueue(url, progress=False)


class FailureLedger:
    """Per-task failure records and the dead-letter store, kept as JSON files in a folder.

    For a file queue the folder lives inside the queue directory, so every worker on the shared
    filesystem sees the same counts. For SQS, pass a shared folder (or use SQS's own redrive
    policy, which this mirrors).
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

    def record_failure(self, task_id: str, payload: dict, error: str) -> int:
        """Append one failure; returns how many times this task has now failed."""
        self.failures.mkdir(parents=True, exist_ok=True)
        path = self.failures / f"{task_id}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"time": time.time(), "error": error}) + "\n")
        with open(path) as f:
            return sum(1 for _ in f)

    def errors(self, task_id: str) -> list[dict]:
        path = self.failures / f"{task_id}.jsonl"
        if not path.exists():
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def bury(self, task_id: str, payload: dict) -> Path:
        """Write the dead-letter record (atomically, then the caller deletes the task)."""
        self.dead_letter.mkdir(parents=True, exist_ok=True)
        record = {"id": task_id, "payload": payload, "failures": self.errors(task_id)}
        final = self.dead_letter / f"{task_id}.json"
        tmp = final.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, final)
        return final

    def forget(self, task_id: str) -> None:
        (self.failures / f"{task_id}.jsonl").unlink(missing_ok=True)

    def dead_count(self) -> int:
        return len(list(self.dead_letter.glob("*.json"))) if self.dead_letter.exists() else 0

    def failing_count(self) -> int:
        return len(list(self.failures.glob("*.jsonl"))) if self.failures.exists() else 0

    def dead_records(self) -> list[dict]:
        if not self.dead_letter.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dead_letter.glob("*.json"))]


@dataclass(frozen=True)
class QueueStatus:
    inserted: int
    enqueued: int
    leased: int
    completed: int
    failed: int
    retrying: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def queue_status(spec: str, ledger_dir: str | None = None) -> QueueStatus:
    tq = open_queue(spec, create=False)
    ledger = FailureLedger.for_queue(spec, ledger_dir)
    return QueueStatus(
        inserted=int(tq.inserted),
        enqueued=int(tq.enqueued),
        leased=int(tq.leased),
        completed=int(tq.completed),
        failed=ledger.dead_count(),
        retrying=ledger.failing_count(),
    )


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
