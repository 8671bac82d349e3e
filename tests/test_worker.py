"""The worker on a real fq:// queue: retries, dead letter, idempotence, SIGTERM, status."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from worker_tasks import FailTask, WriteTask  # noqa: E402

from exaconnect.services.queue import FailureLedger, enqueue, queue_status  # noqa: E402
from exaconnect.services.worker import Worker, WorkerOptions  # noqa: E402

EXA = [sys.executable, "-m", "exaconnect.cli"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}


def test_failing_task_is_retried_then_dead_lettered_without_stalling_the_rest(tmp_path):
    queue = str(tmp_path / "q")
    enqueue(queue, [FailTask("bad chunk"), WriteTask(str(tmp_path / "good"), "ok")])
    # Lease 0 s: a failed task is leasable again at once, standing in for lease expiry.
    worker = Worker(queue, WorkerOptions(lease_seconds=0, exit_when_empty=True, max_attempts=3, idle_poll_seconds=0.05))
    assert worker.run() == 0
    assert (tmp_path / "good").read_text() == "ok"
    status = queue_status(queue)
    assert (status.enqueued, status.completed, status.failed) == (0, 1, 1)
    [record] = FailureLedger.for_queue(queue).dead_records()
    assert record["payload"]["class"] == "FailTask" and len(record["failures"]) == 3
    assert "RuntimeError: bad chunk" in record["failures"][-1]["error"]


def test_running_a_task_twice_gives_the_same_output(tmp_path):
    queue = str(tmp_path / "q")
    task = WriteTask(str(tmp_path / "out"), "same")
    enqueue(queue, [task, WriteTask(str(tmp_path / "out"), "same")])
    Worker(queue, WorkerOptions(exit_when_empty=True)).run()
    assert (tmp_path / "out").read_text() == "same"
    assert queue_status(queue).completed == 2


def test_sigterm_lets_the_current_task_finish_and_leaves_the_rest(tmp_path):
    queue = str(tmp_path / "q")
    enqueue(queue, [WriteTask(str(tmp_path / f"out{i}"), str(i), seconds=3) for i in range(3)])
    proc = subprocess.Popen(EXA + ["worker", queue, "--task-module", "worker_tasks", "--exit-when-empty"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("*.started")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    finished = [p for p in tmp_path.glob("out?") if p.exists()]
    assert len(finished) == 1  # the task under way completed, no other was started
    status = queue_status(queue)
    assert (status.completed, status.enqueued, status.leased) == (1, 2, 0)


def test_status_and_worker_on_missing_queue_fail_clearly(tmp_path):
    done = subprocess.run(EXA + ["status", str(tmp_path / "nope")], capture_output=True, text=True)
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = subprocess.run(EXA + ["worker", str(tmp_path / "nope"), "--exit-when-empty"], capture_output=True, text=True)
    assert done.returncode == 2 and "enqueue tasks first" in done.stderr


def test_lease_is_renewed_while_a_long_task_runs(tmp_path):
    """A 2 s lease on a 5 s task: without renewal a second worker would take the task too."""
    queue = str(tmp_path / "q")
    enqueue(queue, [WriteTask(str(tmp_path / "out"), "x", seconds=5)])
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(EXA + ["worker", queue, "--task-module", "worker_tasks", "--exit-when-empty",
                                             "--lease-seconds", "2"], env=ENV, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
        time.sleep(2.5)  # the second starts after the first lease would have expired
    logs = [p.communicate(timeout=60)[1] for p in procs]
    assert sum(log.count("WriteTask) done") for log in logs) == 1, logs
    assert queue_status(queue).completed == 1
