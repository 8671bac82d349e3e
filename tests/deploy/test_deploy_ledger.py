"""Issue 23, item 2: the runner sees the dead letters of remote workers that keep their failure
ledger outside the queue (`queue work --ledger-dir LEDGER_DIR/SERVICE`, as the Helm chart and the
PBS pipeline job run them). The workers are deploy/worker-loop.sh itself, executed by bash, with
`apptainer exec` running the worker here directly (deploy/fake/local/apptainer)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL_BIN = ROOT / "deploy" / "fake" / "local"


def _stages(log: Path):
    from worker_tasks import FailTask, WriteTask

    from exaconnect.services.stages import Stage

    @dataclass(frozen=True, kw_only=True)
    class FailingIngest(Stage):
        service = "ingest"
        stage_name = "ledgertest.fail"

        def make_tasks(self):
            return [FailTask("this task always fails")]

    @dataclass(frozen=True, kw_only=True)
    class NextMesh(Stage):
        service = "mesh"
        stage_name = "ledgertest.next"
        upstream: Stage

        def requires(self):
            return (self.upstream,)

        def make_tasks(self):
            return [WriteTask(str(log), "ran")]

    first = FailingIngest()
    return [first, NextMesh(upstream=first)]


def _worker_loop(tmp_path: Path, queue_root: str, ledger: Path, stop_file: Path) -> subprocess.Popen:
    sif = tmp_path / "exaconnect.sif"
    sif.write_text("")
    env = dict(os.environ, PATH=f"{LOCAL_BIN}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               SIF=str(sif), QUEUE_ROOT=queue_root, EXA_STOP_FILE=str(stop_file), SERVICES="ingest mesh",
               LEDGER_DIR=str(ledger), POLL_SECONDS="0.2", MAX_ATTEMPTS="1", LEASE_SECONDS="30", DEVICE="cpu",
               WORKER_ARGS="--task-module worker_tasks --retry-delay-seconds 0")
    return subprocess.Popen(["bash", str(ROOT / "deploy" / "worker-loop.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_runner_sees_dead_letters_in_the_workers_ledger_dir(tmp_path):
    from exaconnect.services.queue import FailureLedger
    from exaconnect.services.runner import RunnerOptions, StageFailed, run_stages

    queue_root = f"fq://{tmp_path / 'queues'}"
    ledger = tmp_path / "ledger"
    stop_file = tmp_path / "runner.done"
    log = tmp_path / "next.txt"
    options = RunnerOptions(queue_root=queue_root, record=str(tmp_path / "record"), workers=0, poll_seconds=0.1,
                            progress=False, stall_seconds=60, ledger_dir=str(ledger))
    outcome: dict = {}

    def runner():
        try:
            outcome["report"] = run_stages(_stages(log), options)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc
        finally:
            stop_file.write_text("done")

    thread = threading.Thread(target=runner)
    thread.start()
    workers = _worker_loop(tmp_path, queue_root, ledger, stop_file)
    thread.join(timeout=120)
    try:
        output, _ = workers.communicate(timeout=60)
    finally:
        if workers.poll() is None:
            workers.kill()
    assert not thread.is_alive(), "the runner did not finish"
    assert workers.returncode == 0, output
    # the workers kept the dead letter in LEDGER_DIR/ingest, not inside the queue
    assert FailureLedger(ledger / "ingest").dead_ids(), output
    assert not FailureLedger.for_queue(f"{queue_root}/ingest").dead_ids()
    error = outcome.get("error")
    assert isinstance(error, StageFailed), f"the runner recorded the failed stage as done: {outcome}"
    assert "ledgertest.fail" in str(error) and "1 tasks dead-lettered" in str(error)
    assert str(ledger / "ingest") in str(error) and "this task always fails" in str(error)
    assert not log.exists(), "the next stage ran on the failed stage's hole"


def test_runner_ledger_dir_per_service():
    from exaconnect.services.runner import RunnerOptions, service_ledger

    options = RunnerOptions(queue_root="fq:///q", record="/r", ledger_dir="/lus/ledger")
    assert service_ledger(options, "segment") == "/lus/ledger/segment"
    assert service_ledger(RunnerOptions(queue_root="fq:///q", record="/r"), "segment") is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
