"""Issue 23, items 4-6: the PBS scripts executed by bash under a simulated PBS job. Workers are
real `exaconnect queue work` processes (deploy/fake/local/apptainer runs the container's command
here directly); mpiexec, module and qsub are the recording shims of deploy/fake."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pbs_job import fake_log, pbs_job_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
FAKE_BIN = DEPLOY / "fake"
LOCAL_BIN = FAKE_BIN / "local"


def _job_env(tmp_path: Path, nodes: int = 1, real_workers: bool = False, **env) -> dict:
    """A job whose site settings are blank (no binds, modules or CPU list), with the tests' task
    modules importable; `real_workers`: deploy/fake/local runs the workers for real."""
    path_before = (str(LOCAL_BIN), str(Path(sys.executable).parent)) if real_workers else ()
    return pbs_job_env(tmp_path, nodes, path_before=path_before, BINDS="", MODULE_USE="", CPU_BIND_LIST="",
                       PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env)


# ---------------------------------------------------------------- item 5: the walltime

def test_walltime_finishes_short_tasks_and_releases_long_ones(tmp_path):
    """Two workers, a task that ends within STOP_GRACE and one that would not: the first SIGTERM
    lets the short one finish, the second (RELEASE_GRACE before the walltime) gives the long one
    back to the queue, so the next job leases it at once instead of after its 30-minute lease."""
    from worker_tasks import WriteTask

    from exaconnect.services.queue import open_queue, queue_status

    queue = f"fq://{tmp_path / 'queues' / 'segment'}"
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    tq = open_queue(queue, create=True)
    tq.insert([WriteTask(str(short), "short", 6.0), WriteTask(str(long), "long", 300.0)])
    env = _job_env(tmp_path, real_workers=True, QUEUE=queue, WORKERS_PER_NODE="2", DEVICE="cpu", MODULES="",
                   WALLTIME="00:00:30", STOP_GRACE="20", RELEASE_GRACE="5", LEASE_SECONDS="1800",
                   WORKER_ARGS="--task-module worker_tasks")
    started = time.monotonic()
    out = subprocess.run(["bash", str(DEPLOY / "aurora" / "workers.pbs")], env=env, capture_output=True, text=True,
                         timeout=60)
    seconds = time.monotonic() - started
    print(f"\nworkers.pbs with a 30 s walltime ended after {seconds:.1f} s (rc {out.returncode})\n{out.stderr[-3000:]}")
    assert out.returncode == 124, out.stderr  # stopped before the walltime, work left
    assert seconds < 30, "the job must end before its walltime"
    # SIGTERM at 10 s (both workers have started their tasks), the second at 25 s, SIGKILL at 28 s
    assert "a second one 15s later" in out.stderr and "second SIGTERM" in out.stderr
    assert "SIGKILL (" not in out.stderr, "the workers should have exited on the second SIGTERM"
    assert short.read_text() == "short", "the task that fits in STOP_GRACE finishes"
    assert not long.exists() and Path(str(long) + ".started").exists()
    status = queue_status(queue)
    assert (status.enqueued, status.leased, status.completed) == (1, 0, 1), status.as_dict()
    # the next job's worker gets the released task immediately
    leased_at = time.monotonic()
    lease = tq.lease(seconds=60)
    assert lease is not None and time.monotonic() - leased_at < 5


def test_walltime_timeline_is_logged_for_default_grace(tmp_path):
    env = _job_env(tmp_path, QUEUE="fq:///q", WORKERS_PER_NODE="1", WALLTIME="01:00:00")
    out = subprocess.run(["bash", str(DEPLOY / "aurora" / "workers.pbs")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    m = re.search(r"SIGTERM after (\d+)s .* a second one (\d+)s later .* SIGKILL (\d+)s after that", out.stderr)
    assert m, out.stderr
    first, second, kill = map(int, m.groups())
    assert 3290 <= first <= 3300 and second == 240 and kill == 55  # 300 s, 60 s and 5 s before the walltime


# ---------------------------------------------------------------- item 6: Aurora and Polaris details

def test_no_placeholder_account_and_readme_passes_one():
    for script in sorted(DEPLOY.glob("*/*.pbs")):
        text = script.read_text()
        assert not re.search(r"^#PBS -A", text, re.M), f"{script}: PBS rejects a placeholder project; use qsub -A"
        for line in re.findall(r"^#\s+(qsub .*)$", text, re.M):
            assert " -A " in line, f"{script}: example {line!r} lacks -A"
    readme = (ROOT / "README.md").read_text()
    qsubs = re.findall(r"`(qsub [^`]*)`", readme)
    assert qsubs and all(" -A " in q for q in qsubs), qsubs


def test_daos_loads_its_module_from_soft_modulefiles(tmp_path):
    env = _job_env(tmp_path, QUEUE="fq:///tmp/pool/cont/queues/mesh", DAOS_POOL="pool", DAOS_CONT="cont",
                   WORKERS_PER_NODE="1")
    for name in ("MODULE_USE", "MODULES"):  # Aurora's defaults (deploy/aurora/platform.sh)
        env.pop(name, None)
    out = subprocess.run(["bash", str(DEPLOY / "aurora" / "workers.pbs")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    steps = [[c["command"], *c["argv"]] for c in fake_log(tmp_path, "commands.jsonl")]
    assert steps[:4] == [["module", "use", "/soft/modulefiles"], ["module", "load", "apptainer"],
                         ["module", "load", "daos"], ["launch-dfuse.sh", "pool:cont"]], steps


def test_submit_passes_resources_to_qsub(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    env = dict(os.environ, PATH=f"{FAKE_BIN}:{os.environ['PATH']}", FAKE_LOG=str(log))
    out = subprocess.run([str(DEPLOY / "submit.sh"), "configs/demo.yaml", "--queue-root", "fq:///lus/flare/q",
                          "--sif", "/lus/flare/x.sif", "--account", "PROJ", "-l", "filesystems=flare:daos_user",
                          "--train", "configs/train_synthetic.yaml"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for record in fake_log(tmp_path, "commands.jsonl"):
        argv = record["argv"]
        assert ["-A", "PROJ"] == argv[argv.index("-A"):argv.index("-A") + 2]
        assert "filesystems=flare:daos_user" in argv and argv[argv.index("filesystems=flare:daos_user") - 1] == "-l"
    bad = subprocess.run([str(DEPLOY / "submit.sh"), "configs/demo.yaml", "-l", "flare"], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "RESOURCE=VALUE" in bad.stderr


@pytest.mark.parametrize("queue,service", [
    ("fq:///lus/flare/projects/P/queues/mesh", "mesh"),
    ("fq:///lus/flare/projects/P/queues/segment/", "segment"),
    ("https://sqs.us-east-1.amazonaws.com/123456789012/exa-skeleton", "skeleton"),
])
def test_workers_job_keeps_one_ledger_per_service(tmp_path, queue, service):
    """workers.pbs uses LEDGER_DIR/SERVICE, as the pipeline job does, so `dead-letters requeue --all`
    on one service's ledger cannot put another queue's tasks on this queue."""
    env = _job_env(tmp_path, QUEUE=queue, WORKERS_PER_NODE="1", LEDGER_DIR="/lus/flare/projects/P/ledger")
    out = subprocess.run(["bash", str(DEPLOY / "aurora" / "workers.pbs")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    (run,) = fake_log(tmp_path, "apptainer.jsonl")
    argv = run["argv"]
    assert argv[argv.index("--ledger-dir") + 1] == f"/lus/flare/projects/P/ledger/{service}"


def test_pipeline_job_passes_stall_limit_and_ledger_dir(tmp_path):
    env = _job_env(tmp_path, 2, PIPELINE="configs/demo.yaml", QUEUE_ROOT="fq:///lus/flare/q", POLL_SECONDS="0",
                   SERVICES="ingest segment",
                   WORKERS_PER_NODE="1", LEDGER_DIR="/lus/flare/ledger", STALL_SECONDS="1800",
                   OUTPUT="/lus/flare/out", EXA_STOP_FILE=str(tmp_path / "runner.done"))
    out = subprocess.run(["bash", str(DEPLOY / "aurora" / "pipeline.pbs")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    (runner,) = [r for r in fake_log(tmp_path, "apptainer.jsonl") if "run" in r["argv"]]
    argv = runner["argv"]
    assert argv[argv.index("exaconnect"):] == [
        "exaconnect", "run", "configs/demo.yaml", "--queue-root", "fq:///lus/flare/q", "--workers", "0",
        "--stall-seconds", "1800", "--ledger-dir", "/lus/flare/ledger", "--output", "/lus/flare/out"]


def test_pipeline_job_stops_its_runner_when_the_walltime_stops_the_workers(tmp_path):
    """Workers stopped at the walltime leave the runner waiting for them: the job stops it too and
    exits 124 (resubmit), promptly; no rank sleeps out its poll interval after SIGTERM."""
    from worker_tasks import NoopTask

    from exaconnect.services.queue import open_queue

    # a task waiting, or the ranks would not start a worker (an empty file queue is skipped)
    open_queue(f"fq://{tmp_path / 'q' / 'segment'}", create=True).insert([NoopTask(0)])
    env = _job_env(tmp_path, PIPELINE="configs/demo.yaml", QUEUE_ROOT=f"fq://{tmp_path / 'q'}", WORKERS_PER_NODE="2",
                   SERVICES="ingest segment",
                   FAKE_APPTAINER_WAIT="1", WALLTIME="00:00:12", STOP_GRACE="8", RELEASE_GRACE="3",
                   POLL_SECONDS="15", EXA_STOP_FILE=str(tmp_path / "runner.done"))
    started = time.monotonic()
    out = subprocess.run(["bash", str(DEPLOY / "aurora" / "pipeline.pbs")], env=env, capture_output=True, text=True,
                         timeout=60)
    seconds = time.monotonic() - started
    assert out.returncode == 124, out.stderr
    assert seconds < 10, f"the job took {seconds:.1f} s to stop after the first SIGTERM at 4 s"
    assert "stopping the runner" in out.stderr and "SIGKILL (" not in out.stderr
    signals = [r for r in fake_log(tmp_path, "apptainer.jsonl") if "signal" in r]
    assert len(signals) == 3 and {s["signal"] for s in signals} == {"TERM"}, signals  # 2 workers and the runner


def test_ranks_start_workers_only_for_queues_with_tasks_and_runner_gets_run_args(tmp_path):
    """A rank's pass over the services starts the container only for a file queue holding a task
    (an idle pass costs a listing, not a Python start-up per service), and RUN_ARGS reach the runner."""
    from worker_tasks import NoopTask

    from exaconnect.services.queue import open_queue

    open_queue(f"fq://{tmp_path / 'q' / 'segment'}", create=True).insert([NoopTask(0)])
    open_queue(f"fq://{tmp_path / 'q' / 'mesh'}", create=True)  # exists, empty
    env = _job_env(tmp_path, PIPELINE="configs/demo.yaml", QUEUE_ROOT=f"fq://{tmp_path / 'q'}", WORKERS_PER_NODE="2",
                   SERVICES="ingest segment mesh", POLL_SECONDS="0", RUN_ARGS="--forget segment --set pipeline.name=again",
                   FAKE_APPTAINER_WAIT="1", WALLTIME="00:00:10", STOP_GRACE="6", RELEASE_GRACE="2",
                   EXA_STOP_FILE=str(tmp_path / "runner.done"))
    out = subprocess.run(["bash", str(DEPLOY / "aurora" / "pipeline.pbs")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 124, out.stderr  # the runner and the workers wait until the walltime stops them
    runs = [r["argv"] for r in fake_log(tmp_path, "apptainer.jsonl") if "argv" in r]
    (runner,) = [a for a in runs if "run" in a]
    assert runner[-4:] == ["--forget", "segment", "--set", "pipeline.name=again"]
    queues = {a[a.index("work") + 1].rsplit("/", 1)[1] for a in runs if "work" in a}
    assert queues == {"segment"}, queues
