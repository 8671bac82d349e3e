"""Issue 24, item 1: a hung task is ended after `--task-timeout` seconds, even one holding the GIL
(its lease keeper, a separate process, ends the worker), the end counts as an attempt with the
reason "timed out after N s", and local runs through the runner apply the same limit."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker_tasks import GilTask, SleepTask, WriteTask  # noqa: E402

from exaconnect.errors import QueueError  # noqa: E402
from exaconnect.services.queue import FailureLedger, enqueue, queue_status  # noqa: E402
from exaconnect.services.worker import EXIT_DEAD_LETTERED, WorkerOptions  # noqa: E402

from conftest import queue_work as work  # noqa: E402


def test_a_hung_python_task_times_out_each_attempt_and_is_dead_lettered(tmp_path):
    queue, log = tmp_path / "q", tmp_path / "log"
    enqueue(str(queue), [SleepTask(str(log), 3600), WriteTask(str(tmp_path / "ok"), "ok")])
    started = time.monotonic()
    done = work(queue, "--task-timeout", "2", "--max-attempts", "2", "--retry-delay-seconds", "0",
                "--lease-seconds", "10", "--exit-when-empty")
    assert done.returncode == EXIT_DEAD_LETTERED, done.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert log.read_text().count("start") == 2 and "done" not in log.read_text()
    [record] = FailureLedger.for_queue(str(queue)).dead_records()
    assert record["payload"]["class"] == "SleepTask"
    assert "timed out after 2 s" in record["reason"] and record["attempts"] == 2, record
    assert (tmp_path / "ok").read_text() == "ok"
    status = queue_status(str(queue))
    assert (status.enqueued, status.completed, status.failed) == (0, 1, 1)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_gil_holding_deaf_task_is_ended_by_its_keeper(tmp_path, processes):
    queue, out = tmp_path / "q", tmp_path / "out"
    enqueue(str(queue), [GilTask(str(out), "never", 3600, deaf=True)])
    started = time.monotonic()
    done = work(queue, "--task-timeout", "2", "--max-attempts", "1", "--lease-seconds", "10", "--exit-when-empty",
                "--processes", processes, timeout=90)
    assert time.monotonic() - started < 60, done.stderr[-3000:]
    assert not out.exists()
    assert Path(str(out) + ".runs").read_text().count("\n") == 1
    [record] = FailureLedger.for_queue(str(queue)).dead_records()
    assert "timed out after 2 s" in record["reason"], record
    assert queue_status(str(queue)).enqueued == 0
    if processes == "2":
        assert done.returncode in (3, 5), done.stderr[-3000:]


def test_a_gil_holding_task_that_times_out_is_retried_until_max_attempts(tmp_path):
    queue, out = tmp_path / "q", tmp_path / "out"
    enqueue(str(queue), [GilTask(str(out), "never", 3600, deaf=True)])
    work(queue, "--task-timeout", "2", "--max-attempts", "2", "--lease-seconds", "10", "--exit-when-empty",
         "--processes", "2", "--retry-delay-seconds", "0", timeout=120)
    assert Path(str(out) + ".runs").read_text().count("\n") == 2
    [record] = FailureLedger.for_queue(str(queue)).dead_records()
    assert "timed out after 2 s" in record["reason"] and record["attempts"] == 2, record


def test_a_task_within_its_time_limit_is_not_disturbed(tmp_path):
    queue, log = tmp_path / "q", tmp_path / "log"
    enqueue(str(queue), [SleepTask(str(log), 1)])
    done = work(queue, "--task-timeout", "5", "--lease-seconds", "10", "--exit-when-empty")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done" in log.read_text()


@pytest.mark.parametrize("value", [0, -1, float("nan")])
def test_a_task_timeout_must_be_positive(value):
    with pytest.raises(QueueError, match="--task-timeout"):
        WorkerOptions(task_timeout_seconds=value)


def test_local_runs_apply_the_task_timeout(tmp_path):
    """A stage drained by the runner's own worker (workers=1) with a GIL-holding hung task fails
    by timeout instead of waiting forever, and the runner process survives to say so."""
    from exaconnect.services.runner import RunnerOptions, StageFailed, run_stages
    from exaconnect.services.stages import Stage

    out = tmp_path / "out"
    stage = _one_task_stage(GilTask(str(out), "never", 3600, deaf=True))
    options = RunnerOptions(queue_root=str(tmp_path / "queues"), record=str(tmp_path / "record"), workers=1,
                            progress=False, max_attempts=1, task_modules=("worker_tasks",), task_timeout_seconds=2)
    started = time.monotonic()
    with pytest.raises(StageFailed, match="timed out after 2 s"):
        run_stages([stage], options)
    assert time.monotonic() - started < 60


def _one_task_stage(task):
    """A runner stage of one task."""
    import dataclasses
    from typing import ClassVar

    from exaconnect.services import stages

    @dataclasses.dataclass(frozen=True)
    class HangStage(stages.Stage):
        service: ClassVar[str] = "hang"
        stage_name: ClassVar[str] = "hang.one"

        def make_tasks(self):
            return [task]

    return HangStage()
