"""A sharded file queue: python-task-queue's `fq://` idea (one file per task, the lease time in its
name, a rename to lease) spread over many sub-folders, with the attempt count in the name.

Layout of a queue folder (every change is one atomic `rename` or `unlink` of one file):

    QUEUE/layout.json                  {"format": "exaconnect-fq", "version": 1, "shards": S}
    QUEUE/queue/NNN/TS--ID--A.json     a task: available when TS <= now, leased until TS otherwise,
                                       A = how many leases it has had (attempts)
    QUEUE/insertions                   tasks ever inserted (locked counter, as upstream)
    QUEUE/completions/NNN              one byte per completed task, one file per shard
    QUEUE/tmp/                         tasks being written (renamed into a shard when complete)

Why not upstream's flat folder: every lease there lists the one folder, so W workers cost W
listings of N entries per task and all collide on the same first entries; on Lustre each listing
and each create/rename in one folder serialises on that folder's lock on one metadata server.
Here a worker lists one shard (N/S entries), keeps the listing and tries its entries until they
run out, and workers start at different shards, so collisions and folder-lock contention fall by
about S. Upstream also keeps a "movement" file per task (to find a renamed lease at delete time),
which costs two more metadata operations per lease and is left behind, empty, when a lease races
a delete; here the lease handle carries the current name, so there are no movement files.

Ownership: a lease is renewed by renaming *our* file name to a later time stamp. If the lease
ran out and another worker took the task, our name no longer exists and the rename fails, so
`renew` tells the caller the lease is lost instead of silently stealing it back.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from taskqueue.lib import jsonify

FORMAT = "exaconnect-fq"
DEFAULT_SHARDS = 64


@dataclass(frozen=True)
class Lease:
    """A leased task: where its file is now, and its raw JSON text (not yet a task object)."""

    shard: int
    name: str
    task_id: str
    attempts: int
    text: str

    @property
    def expires(self) -> int:
        return parse_name(self.name)[0]


def parse_name(name: str) -> tuple[int, str, int]:
    """`TS--ID--A.json` -> (TS, ID, A); upstream's `TS--ID.json` reads as A = 0."""
    stem = name[:-5] if name.endswith(".json") else name
    parts = stem.split("--")
    if len(parts) == 2:
        return int(parts[0]), parts[1], 0
    return int(parts[0]), parts[1], int(parts[2])


def make_name(timestamp: int, task_id: str, attempts: int) -> str:
    return f"{int(timestamp)}--{task_id}--{int(attempts)}.json"


def _now() -> int:
    return int(time.time())


def is_file_queue(path: str | os.PathLike) -> bool:
    return (Path(path) / "layout.json").is_file()


class FileQueue:
    """The queue folder at `path`. `create=True` makes an empty queue when there is none."""

    def __init__(self, path: str | os.PathLike, create: bool = False, shards: int = DEFAULT_SHARDS) -> None:
        self.path = Path(os.path.abspath(os.path.expanduser(str(path))))
        layout = self.path / "layout.json"
        if not layout.is_file():
            if not create:
                raise FileNotFoundError(f"no queue at {self.path} (no {layout})")
            self._create(shards)
        info = json.loads(layout.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{layout}: not an {FORMAT} queue")
        self.shards = int(info["shards"])
        self.queue_path = self.path / "queue"
        self._shard_dirs = [str(self.queue_path / f"{i:03d}") for i in range(self.shards)]
        # Each process starts at its own shard so that workers spread out from the first lease.
        self._cursor = random.Random(os.getpid() ^ int(time.time() * 1e6)).randrange(self.shards)
        self._candidates: list[str] = []

    def _create(self, shards: int) -> None:
        if shards < 1:
            raise ValueError(f"shards {shards}: expected at least 1")
        for i in range(shards):
            (self.path / "queue" / f"{i:03d}").mkdir(parents=True, exist_ok=True)
        (self.path / "completions").mkdir(exist_ok=True)
        (self.path / "tmp").mkdir(exist_ok=True)
        tmp = self.path / f".layout.{os.getpid()}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"format": FORMAT, "version": 1, "shards": shards}))
        try:
            # link, not replace: two pods creating the same queue at once agree on the first layout.
            os.link(tmp, self.path / "layout.json")
        except FileExistsError:
            pass
        finally:
            tmp.unlink()

    # ------------------------------------------------------------------ insert

    def insert(self, tasks, delay_seconds: int = 0, parallel=1, task_id: str | None = None) -> int:
        """Insert tasks (task objects, or payload dicts); returns how many. Each file is written
        under tmp/ and renamed into its shard, so no worker ever reads half a task."""
        from taskqueue.queueables import totask

        if not isinstance(tasks, (list, tuple)):
            tasks = [tasks]
        timestamp = _now() + int(delay_seconds) if delay_seconds > 0 else 0
        count = 0
        shard = random.randrange(self.shards)
        tmp_dir = self.path / "tmp"
        for task in tasks:
            # dicts are registered tasks' payloads, lists function tasks' (a requeued dead letter)
            payload = task if isinstance(task, (dict, list)) else totask(task).payload()
            ident = task_id or str(uuid.uuid4())
            tmp = tmp_dir / f"{ident}.json"
            tmp.write_text(jsonify({"payload": payload, "id": ident}))  # numpy, Vec: igneous payloads
            os.replace(tmp, Path(self._shard_dirs[shard]) / make_name(timestamp, ident, 0))
            shard = (shard + 1) % self.shards
            count += 1
        self._add_insert_count(count)
        return count

    def _add_insert_count(self, count: int) -> None:
        path = self.path / "insertions"
        with open(path, "a+") as f:
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX)
            f.seek(0)
            text = f.read().strip()
            f.seek(0)
            f.truncate()
            f.write(str((int(text) if text else 0) + count))
            f.flush()

    # ------------------------------------------------------------------ lease

    def lease(self, seconds: int) -> Lease | None:
        """Lease one available task for `seconds`, or None when a pass over every shard found
        nothing available. The attempt count in the name goes up by one with the lease."""
        now = _now()
        for _ in range(self.shards + 1):
            while self._candidates:
                name = self._candidates.pop()
                try:
                    ts, ident, attempts = parse_name(name)
                except ValueError:
                    continue
                if ts > now:
                    continue
                shard_dir = self._shard_dirs[self._cursor]
                new = make_name(now + int(seconds), ident, attempts + 1)
                try:
                    os.rename(os.path.join(shard_dir, name), os.path.join(shard_dir, new))
                except FileNotFoundError:
                    continue  # another worker took it since we listed the shard
                try:
                    with open(os.path.join(shard_dir, new)) as f:
                        text = f.read()
                except FileNotFoundError:
                    continue  # deleted by a worker whose lease of it had run out
                return Lease(self._cursor, new, ident, attempts + 1, text)
            if not self._refill(now):
                self._cursor = (self._cursor + 1) % self.shards
        return None

    def _refill(self, now: int) -> bool:
        """List the current shard; keep the available names, in random order."""
        names = []
        with os.scandir(self._shard_dirs[self._cursor]) as entries:
            for entry in entries:
                name = entry.name
                dash = name.find("--")
                if dash > 0 and name[:dash].isdigit() and int(name[:dash]) <= now:
                    names.append(name)
        random.shuffle(names)
        self._candidates = names
        return bool(names)

    def renew(self, lease: Lease, seconds: int) -> Lease | None:
        """Push the lease's end to now + `seconds`; None if the lease is no longer ours."""
        return self._move(lease, _now() + int(seconds), lease.attempts)

    def release(self, lease: Lease, delay_seconds: int = 0, refund: bool = False) -> Lease | None:
        """Make the task available again after `delay_seconds`; `refund` gives the attempt back
        (a task handed back on shutdown did not fail)."""
        attempts = lease.attempts - 1 if refund else lease.attempts
        return self._move(lease, _now() + int(delay_seconds), max(attempts, 0))

    def _move(self, lease: Lease, timestamp: int, attempts: int) -> Lease | None:
        shard_dir = self._shard_dirs[lease.shard]
        new = make_name(timestamp, lease.task_id, attempts)
        try:
            os.rename(os.path.join(shard_dir, lease.name), os.path.join(shard_dir, new))
        except FileNotFoundError:
            return None
        return Lease(lease.shard, new, lease.task_id, attempts, lease.text)

    def release_all(self, refund: bool = True, keep=None) -> int:
        """Make every leased task available now (the runner's resume of a local run, whose
        workers died with it); `refund` gives their attempts back. `keep(task_id, hidden_until)`
        true: leave that one as it is (a failed task waiting out its retry delay holds no lease).
        Returns how many."""
        now, count = _now(), 0
        for shard, ts, ident, attempts in list(self.entries()):
            if ts > now and not (keep is not None and keep(ident, ts)):
                name = make_name(ts, ident, attempts)
                lease = Lease(shard, name, ident, attempts, "")
                if self.release(lease, refund=refund) is not None:
                    count += 1
        return count

    def delete(self, lease: Lease, tally: bool = True) -> bool:
        """Remove a finished task. Returns False when our lease had been lost (the task is then
        removed under whatever name it has now, so it is not run yet again)."""
        try:
            os.unlink(os.path.join(self._shard_dirs[lease.shard], lease.name))
            ours = removed = True
        except FileNotFoundError:
            ours = False
            removed = self.delete_id(lease.task_id, shard=lease.shard)
        if tally and removed:  # a task another worker already deleted is counted once, by it
            with open(self.path / "completions" / f"{lease.shard:03d}", "ab") as f:
                f.write(b"\0")
        return ours

    def delete_id(self, task_id: str, shard: int | None = None) -> bool:
        shards = range(self.shards) if shard is None else [shard]
        for i in shards:
            with os.scandir(self._shard_dirs[i]) as entries:
                for entry in entries:
                    if f"--{task_id}--" in entry.name or entry.name.endswith(f"--{task_id}.json"):
                        try:
                            os.unlink(entry.path)
                            return True
                        except FileNotFoundError:
                            pass
        return False

    # ------------------------------------------------------------------ counts

    def entries(self):
        """(shard, timestamp, task id, attempts) of every task in the queue."""
        for i, shard_dir in enumerate(self._shard_dirs):
            with os.scandir(shard_dir) as entries:
                for entry in entries:
                    try:
                        ts, ident, attempts = parse_name(entry.name)
                    except ValueError:
                        continue
                    yield i, ts, ident, attempts

    @property
    def inserted(self) -> int:
        try:
            text = (self.path / "insertions").read_text().strip()
        except FileNotFoundError:
            return 0
        return int(text) if text else 0

    @property
    def enqueued(self) -> int:
        return sum(1 for _ in self.entries())

    @property
    def leased(self) -> int:
        now = _now()
        return sum(1 for _, ts, _, _ in self.entries() if ts > now)

    @property
    def completed(self) -> int:
        folder = self.path / "completions"
        if not folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in folder.iterdir())

    def is_empty(self) -> bool:
        for shard_dir in self._shard_dirs:
            with os.scandir(shard_dir) as entries:
                for _ in entries:
                    return False
        return True

    def read(self, task_id: str) -> str | None:
        for shard_dir in self._shard_dirs:
            with os.scandir(shard_dir) as entries:
                for entry in entries:
                    if f"--{task_id}--" in entry.name:
                        try:
                            return Path(entry.path).read_text()
                        except FileNotFoundError:
                            return None
        return None

    def purge(self, native: bool = False) -> None:
        """Delete every task and reset the counters (the failure ledger is the caller's)."""
        for shard_dir in self._shard_dirs:
            with os.scandir(shard_dir) as entries:
                for entry in entries:
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        pass
        for folder in (self.path / "completions", self.path / "tmp"):
            for p in folder.iterdir() if folder.is_dir() else ():
                p.unlink(missing_ok=True)
        (self.path / "insertions").unlink(missing_ok=True)
