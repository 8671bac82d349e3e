"""Instrumentation that the fault-injection suite loads into its worker processes
(`--task-module fault_instrument`, with bench/ on PYTHONPATH): every execution of a segment,
mesh or skeleton task is appended to $EXACONNECT_FAULT_LOG (so duplicate runs can be counted),
and with $EXACONNECT_FAULT_SLOW_SECONDS each such task first sleeps that long, making tasks
longer than their leases.

Hung tasks: with $EXACONNECT_FAULT_HANG=python (a sleep) or gil (one C call holding the GIL with
signals blocked, as a decoder stuck in a loop would) and $EXACONNECT_FAULT_HANG_CLASS naming one
of those classes, the first task of that class to run is chosen (its identity written to
$EXACONNECT_FAULT_HANG_FILE) and hangs on every attempt."""

from __future__ import annotations

import os
import time


def _wrap(cls) -> None:
    original = cls.execute
    if getattr(original, "_fault_instrumented", False):
        return

    def execute(self, *args, **kwargs):
        log = os.environ.get("EXACONNECT_FAULT_LOG")
        if log:
            with open(log, "a") as f:
                where = str(getattr(self, "index", getattr(self, "offset", ""))).replace(" ", "")
                f.write(f"{type(self).__name__} {where} {os.getpid()}\n")
        if os.environ.get("EXACONNECT_FAULT_HANG") and os.environ.get("EXACONNECT_FAULT_HANG_CLASS") == type(self).__name__:
            where = str(getattr(self, "index", getattr(self, "offset", ""))).replace(" ", "")
            if _chosen_to_hang(f"{type(self).__name__} {where}"):
                _hang(os.environ["EXACONNECT_FAULT_HANG"])
        slow = float(os.environ.get("EXACONNECT_FAULT_SLOW_SECONDS", "0") or 0)
        if slow:
            time.sleep(slow)
        return original(self, *args, **kwargs)

    execute._fault_instrumented = True  # type: ignore[attr-defined]
    cls.execute = execute


def _chosen_to_hang(identity: str) -> bool:
    """The first task to ask is chosen (written atomically to the hang file); it alone hangs."""
    path = os.environ["EXACONNECT_FAULT_HANG_FILE"]
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        for _ in range(50):  # the chooser may not have written it yet
            with open(path) as f:
                chosen = f.read()
            if chosen:
                return chosen == identity
            time.sleep(0.01)
        return False
    with os.fdopen(fd, "w") as f:
        f.write(identity)
    return True


def _hang(how: str) -> None:
    if how == "gil":
        import ctypes
        import signal

        blocked = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        ctypes.PyDLL(None).sleep(3600)
    time.sleep(3600)


def install() -> None:
    from igneous.tasks import MeshTask, SkeletonTask

    from exaconnect.services.segment import SegmentTask
    from exaconnect.services.stitch import SegmentRelabelTask

    for cls in (SegmentTask, SegmentRelabelTask, MeshTask, SkeletonTask):
        _wrap(cls)


install()
