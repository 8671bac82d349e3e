"""Helpers shared by the benchmarks: where ../shared is, timing, and the JSON line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EXACONNECT_SHARED", REPO.parent / "shared"))
FIB25 = SHARED / "data" / "fib25" / "training_sample2"


def require_fib25() -> Path:
    if not FIB25.exists():
        print(json.dumps({"skipped": f"FIB-25 data not found at {FIB25}"}))
        sys.exit(0)
    return FIB25


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def emit(name: str, **figures) -> None:
    print(json.dumps({"benchmark": name, **figures}))
