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
