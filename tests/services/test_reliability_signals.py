"""Issue 24, item 5: SIGTERM (and Ctrl-C) to a run stops it: no new tasks or stages start, running
tasks finish within the grace period or are released, where it stopped is recorded, the exit is
non-zero, and the next run resumes and finishes with every task done exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _start(root: Path, workers: int, seconds: float, tasks: int, grace: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / "reliability_driver.py"), str(root), str(workers),
                             str(seconds), str(tasks), str(grace)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_starts(log: Path, count: int, process: subprocess.Popen, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count("start ") >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no {count} task starts in {limit} s: {process.communicate()}")


def _events(log: Path) -> tuple[Counter, Counter]:
    lines = log.read_text().split("\n") if log.exists() else []
    starts = Counter(line.split()[1] for line in lines if line.startswith("start "))
    done = Counter(line.split()[1] for line in lines if line.startswith("done "))
    return starts, done


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_lets_running_tasks_finish_starts_nothing_new_and_the_rerun_resumes(tmp_path, sig):
    log = tmp_path / "slow.log"
    run = _start(tmp_path, workers=2, seconds=3, tasks=6, grace=60)
    _wait_for_starts(log, 2, run)
    signalled = time.monotonic()
    run.send_signal(sig)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 128 + sig, (out, err)
    assert time.monotonic() - signalled < 30, err
    starts, done = _events(log)
    assert 2 <= sum(starts.values()) < 6, (starts, err)  # not every task was started
    assert done == starts, (starts, done)  # those running finished within the grace period
    assert not (tmp_path / "after.log").exists()  # the next stage never started
    stopped = json.loads((tmp_path / "record" / "stopped.json").read_text())
    assert stopped["stage"] == "slow" and stopped["signal"] == signal.Signals(sig).name
    assert stopped["tasks_left"] == 6 - sum(done.values())
    assert "stopped by" in err and "slow" in err

    rerun = _start(tmp_path, workers=2, seconds=3, tasks=6, grace=60)
    out, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, (out, err)
    starts, done = _events(log)
    assert done == Counter({f"t{i}": 1 for i in range(6)}), done  # each task done exactly once
    assert (tmp_path / "after.log").read_text() == "after:x\n"
    assert not (tmp_path / "record" / "stopped.json").exists()
    assert not (tmp_path / "record" / "run.lock").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_tasks_still_running_after_the_grace_period_are_released_and_rerun(tmp_path, workers):
    log = tmp_path / "slow.log"
    run = _start(tmp_path, workers=workers, seconds=40, tasks=2, grace=1)
    _wait_for_starts(log, workers, run)
    signalled = time.monotonic()
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=90)
    assert run.returncode == 128 + signal.SIGTERM, (out, err)
    assert time.monotonic() - signalled < 20, err  # not the 40 s of the task
    starts, done = _events(log)
    assert sum(done.values()) == 0 and sum(starts.values()) == workers
    stopped = json.loads((tmp_path / "record" / "stopped.json").read_text())
    assert stopped["tasks_left"] == 2
    # The released tasks are on the queue again with their attempts refunded: not dead-lettered.
    from exaconnect.services.queue import queue_status

    status = queue_status(str(tmp_path / "queues" / "ingest"))
    assert (status.enqueued, status.failed) == (2, 0)
