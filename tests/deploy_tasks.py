"""Tasks for the deployment tests (tests/deploy/test_deploy_helm.py), imported by workers with
`--task-module deploy_tasks`."""

import ctypes
import os
import signal
from pathlib import Path

from taskqueue import RegisteredTask


class HungTask(RegisteredTask):
    """Hangs for `seconds` in one C call that holds the GIL with every catchable signal blocked (as
    a C decoder stuck in a loop would): the worker cannot stop it; only SIGKILL ends it. Appends
    the worker's PID to `path`.runs at every start."""

    def __init__(self, path: str, seconds: float):
        super().__init__(path, seconds)

    def execute(self):
        with open(self.path + ".runs", "a") as f:
            f.write(f"{os.getpid()}\n")
        deaf = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, deaf)
        try:
            ctypes.PyDLL(None).sleep(int(self.seconds))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        Path(self.path).write_text("woke up")
