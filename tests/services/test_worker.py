"""The worker on a real fq:// queue: retries, dead letter, idempotence, SIGTERM, status."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker_tasks import FailTask, WriteTask  # noqa: E402

from exaconnect.services.queue import FailureLedger, enqueue, queue_status  # noqa: E402
from exaconnect.services.worker import EXIT_DEAD_LETTERED, Worker, WorkerOptions  # noqa: E402

QUEUE_CLI = [sys.executable, "-m", "exaconnect.cli.queue"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_failing_task_is_retried_then_dead_lettered_without_stalling_the_rest(tmp_path):
    queue = str(tmp_path / "q")
    enqueue(queue, [FailTask("bad chunk"), WriteTask(str(tmp_path / "good"), "ok")])
    # No retry delay: a failed task is leasable again at once (by default it waits one lease).
    worker = Worker(queue, WorkerOptions(lease_seconds=10, retry_delay_seconds=0, exit_when_empty=True,
                                         max_attempts=3, idle_poll_seconds=0.05))
    assert worker.run() == EXIT_DEAD_LETTERED
    assert (tmp_path / "good").read_text() == "ok"
    status = queue_status(queue)
    # A dead-lettered task is failed, not retrying.
    assert (status.enqueued, status.completed, status.failed, status.retrying) == (0, 1, 1, 0)
    [record] = FailureLedger.for_queue(queue).dead_records()
    assert record["payload"]["class"] == "FailTask" and len(record["failures"]) == 3
    assert "RuntimeError: bad chunk" in record["failures"][-1]["error"]
    assert "RuntimeError: bad chunk" in record["reason"] and record["attempts"] == 3


def test_a_failed_task_counts_as_retrying_until_it_succeeds_or_is_dead_lettered(tmp_path):
    queue = str(tmp_path / "q")
    enqueue(queue, [FailTask("once")])
    Worker(queue, WorkerOptions(lease_seconds=10, retry_delay_seconds=3600, max_attempts=2, max_tasks=1,
                                idle_poll_seconds=0.05)).run()
    status = queue_status(queue)
    assert (status.enqueued, status.failed, status.retrying) == (1, 0, 1)


def test_running_a_task_twice_gives_the_same_output(tmp_path):
    queue = str(tmp_path / "q")
    enqueue(queue, [WriteTask(str(tmp_path / "out"), "same"), WriteTask(str(tmp_path / "out"), "same")])
    Worker(queue, WorkerOptions(exit_when_empty=True)).run()
    assert (tmp_path / "out").read_text() == "same"
    assert queue_status(queue).completed == 2


def test_sigterm_lets_the_current_task_finish_and_leaves_the_rest(tmp_path):
    queue = str(tmp_path / "q")
    enqueue(queue, [WriteTask(str(tmp_path / f"out{i}"), str(i), seconds=3) for i in range(3)])
    proc = subprocess.Popen(QUEUE_CLI + ["work", queue, "--task-module", "worker_tasks", "--exit-when-empty"], env=ENV,
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
    done = subprocess.run(QUEUE_CLI + ["status", str(tmp_path / "nope")], capture_output=True, text=True)
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = subprocess.run(QUEUE_CLI + ["work", str(tmp_path / "nope"), "--exit-when-empty"], capture_output=True, text=True)
    assert done.returncode == 2 and "enqueue tasks first" in done.stderr
    assert "Traceback" not in done.stderr


def test_lease_is_renewed_while_a_long_task_runs(tmp_path):
    """A 10 s lease on a 14 s task: without renewal the second worker would take the task too."""
    queue = str(tmp_path / "q")
    enqueue(queue, [WriteTask(str(tmp_path / "out"), "x", seconds=14)])
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(QUEUE_CLI + ["work", queue, "--task-module", "worker_tasks", "--exit-when-empty",
                                                   "--lease-seconds", "10"], env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        time.sleep(11)  # the second starts after the first lease would have expired
    logs = [p.communicate(timeout=60)[1] for p in procs]
    assert sum(log.count("WriteTask) done") for log in logs) == 1, logs
    assert queue_status(queue).completed == 1
