"""One run at a time on one output: `exaconnect run` holds `OUTPUT/pipeline/run.lock` while it runs.

Without it a second run on the same output releases the first's live leases as if they were left
by a dead run, and both do the same work. The lock file says who holds it (host, pid, when it
started); a second run refuses with that, exit 2. A lock left by a run that died without
removing it (SIGKILL, a crashed node) is taken over when it names a process of this host that
no longer exists (or a different process under a reused pid); a lock from another host cannot
be judged from here and has to be removed by hand once that run is known to be gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from exaconnect.errors import ExaconnectError

log = logging.getLogger("exaconnect.runner")

LOCK_NAME = "run.lock"


class RunLocked(ExaconnectError):
    """Another run holds the output's lock."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """`with RunLock(folder):` holds FOLDER/run.lock, or raises RunLocked naming its holder."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def _mine(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "time": time.time()}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._mine(), f)
        return True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return
            holder = self._holder()
            if holder is None:
                continue  # removed meanwhile: try again
            host, pid = holder.get("host"), holder.get("pid")
            if host == socket.gethostname() and pid == os.getpid():
                return  # this process holds it already (an outer lock on the same folder)
            if host == socket.gethostname() and isinstance(pid, int) and \
                    not _alive(pid, holder.get("process_start")):
                log.warning("taking over %s: its run (pid %s, started %s) no longer exists", self.path, pid,
                            holder.get("started"))
                # Rename, not unlink: of two runs taking over at once, only one removes the stale file.
                stale = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, stale)
                    os.unlink(stale)
                except FileNotFoundError:
                    pass
                continue
            if not holder:
                raise RunLocked(f"{self.path}: held by a run whose lock file cannot be read; if no run is using "
                                "this output, remove the file")
            raise RunLocked(f"another run holds {self.path} (host {host}, pid {pid}, "
                            f"started {holder.get('started')}); wait for it to finish, or stop it (SIGTERM) — if it "
                            "is gone and ran on another host, remove the lock file")
        raise RunLocked(f"{self.path}: could not take the lock (changing under us); try again")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
