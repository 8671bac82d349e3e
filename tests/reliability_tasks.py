"""Task classes for the reliability tests, importable by spawned worker processes
(`RunnerOptions.task_modules=("reliability_tasks",)` with tests/ on PYTHONPATH)."""

from __future__ import annotations

import os
import time

from taskqueue import RegisteredTask


class NamedSleepTask(RegisteredTask):
    """Sleeps `seconds` (interruptibly), appending `start NAME PID` and `done NAME PID` to `path`."""

    def __init__(self, path: str, name: str, seconds: float):
        super().__init__(path, name, seconds)

    def execute(self):
        with open(self.path, "a") as f:
            f.write(f"start {self.name} {os.getpid()}\n")
        time.sleep(float(self.seconds))
        with open(self.path, "a") as f:
            f.write(f"done {self.name} {os.getpid()}\n")
