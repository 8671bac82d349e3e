"""Instrumentation that the fault-injection suite loads into its worker processes
(`--task-module fault_instrument`, with bench/ on PYTHONPATH): every execution of a segment,
mesh or skeleton task is appended to $EXACONNECT_FAULT_LOG (so duplicate runs can be counted),
and with $EXACONNECT_FAULT_SLOW_SECONDS each such task first sleeps that long, making tasks
longer than their leases."""

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
        slow = float(os.environ.get("EXACONNECT_FAULT_SLOW_SECONDS", "0") or 0)
        if slow:
            time.sleep(slow)
        return original(self, *args, **kwargs)

    execute._fault_instrumented = True  # type: ignore[attr-defined]
    cls.execute = execute


def install() -> None:
    from igneous.tasks import MeshTask, SkeletonTask

    from exaconnect.services.segment import SegmentTask
    from exaconnect.services.stitch import SegmentRelabelTask

    for cls in (SegmentTask, SegmentRelabelTask, MeshTask, SkeletonTask):
        _wrap(cls)


install()
