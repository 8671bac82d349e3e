"""Task classes for the worker tests, importable by worker subprocesses (--task-module worker_tasks)."""

import os
import time
from pathlib import Path

from taskqueue import RegisteredTask


class WriteTask(RegisteredTask):
    """Writes `text` to `path` (atomically) after `seconds`; marks its start in `path`.started."""

    def __init__(self, path: str, text: str, seconds: float = 0.0):
        super().__init__(path, text, seconds)

    def execute(self):
        Path(self.path + ".started").write_text(str(os.getpid()))
        time.sleep(float(self.seconds))
        tmp = self.path + ".tmp"
        Path(tmp).write_text(self.text)
        os.replace(tmp, self.path)


class FailTask(RegisteredTask):
    def __init__(self, message: str):
        super().__init__(message)

    def execute(self):
        raise RuntimeError(self.message)


class NoopTask(RegisteredTask):
    def __init__(self, index: int):
        super().__init__(index)

    def execute(self):
        pass


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


class KillTask(RegisteredTask):
    """Records a run in `path`, then SIGKILLs its own worker (an OOM kill, a node lost)."""

    def __init__(self, path: str):
        super().__init__(path)

    def execute(self):
        import signal

        _append(self.path, str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


class SegfaultTask(RegisteredTask):
    """Records a run in `path`, then crashes the interpreter (a decoder segfaulting on bad bytes)."""

    def __init__(self, path: str):
        super().__init__(path)

    def execute(self):
        import ctypes

        _append(self.path, str(os.getpid()))
        ctypes.string_at(0)


class GilTask(RegisteredTask):
    """Holds the GIL for `seconds` in one C call (libc sleep through ctypes.PyDLL, which does not
    release it, like a long C decoder), then writes `text` to `path`; every start is appended to
    `path`.runs. With `deaf`, signals are blocked during the call, as a C loop that never returns
    to the interpreter would in effect be (a plain sleep returns early on a signal)."""

    def __init__(self, path: str, text: str, seconds: float, deaf: bool = False):
        super().__init__(path, text, seconds, deaf)

    def execute(self):
        import ctypes
        import signal

        _append(self.path + ".runs", str(os.getpid()))
        blocked = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT} if self.deaf else set()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            ctypes.PyDLL(None).sleep(int(self.seconds))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        Path(self.path).write_text(self.text)


class SleepTask(RegisteredTask):
    """Sleeps `seconds` in Python (interruptible), appending starts and finishes to `path`."""

    def __init__(self, path: str, seconds: float):
        super().__init__(path, seconds)

    def execute(self):
        _append(self.path, f"start {os.getpid()}")
        time.sleep(float(self.seconds))
        _append(self.path, f"done {os.getpid()}")
