"""Workers under faults: tasks that kill or crash their worker, payloads that cannot be rebuilt,
tasks that hold the GIL past the lease, lost leases, bad options, dead children."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker_tasks import GilTask, KillTask, SegfaultTask, SleepTask, WriteTask  # noqa: E402

from exaconnect.services.file_queue import FileQueue  # noqa: E402
from exaconnect.services.queue import FailureLedger, enqueue, open_queue, queue_status  # noqa: E402
from exaconnect.services.worker import (EXIT_BOTH, EXIT_DEAD_LETTERED, EXIT_WORKER_DIED,  # noqa: E402
                                        Worker, WorkerOptions)

from conftest import QUEUE_CLI, queue_work as work  # noqa: E402
from conftest import TASKS_ENV as ENV  # noqa: E402


def test_a_task_that_sigkills_its_worker_is_dead_lettered_after_exactly_max_attempts(tmp_path):
    queue = tmp_path / "q"
    runs = tmp_path / "runs"
    enqueue(str(queue), [KillTask(str(runs))] + [WriteTask(str(tmp_path / f"ok{i}"), "ok") for i in range(4)])
    done = work(queue, "--processes", "2", "--lease-seconds", "10", "--max-attempts", "2", "--exit-when-empty",
                "--max-restarts", "5")
    assert runs.read_text().count("\n") == 2, done.stderr[-3000:]  # exactly --max-attempts leases ran it
    assert done.returncode == EXIT_BOTH, done.stderr[-3000:]  # children died, and a task was dead-lettered
    assert "died (SIGKILL) while running task" in done.stderr
    assert "(KillTask, box None) started" in done.stderr
    [record] = FailureLedger.for_queue(str(queue)).dead_records()
    assert record["payload"]["class"] == "KillTask"
    assert record["reason"].startswith("worker died while running it (SIGKILL)"), record["reason"]
    status = queue_status(str(queue))
    assert (status.enqueued, status.completed, status.failed, status.retrying) == (0, 4, 1, 0)


def test_a_worker_process_killed_from_outside_is_logged_replaced_and_its_task_redone(tmp_path):
    queue = tmp_path / "q"
    log = tmp_path / "log"
    enqueue(str(queue), [SleepTask(str(log), 4), SleepTask(str(log), 4)])
    proc = subprocess.Popen(QUEUE_CLI + ["work", str(queue), "--task-module", "worker_tasks", "--processes", "2",
                                         "--lease-seconds", "10", "--exit-when-empty"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (log.exists() and "start" in log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    victim = int(log.read_text().split()[1])
    os.kill(victim, signal.SIGKILL)  # the OOM killer, say
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_WORKER_DIED, err[-3000:]
    assert f"worker {victim} died (SIGKILL) while running task" in err
    assert "starting a replacement worker" in err
    assert log.read_text().count("done") == 2
    status = queue_status(str(queue))
    assert (status.enqueued, status.completed, status.failed, status.retrying) == (0, 2, 0, 0)


def test_a_segfault_leaves_a_python_stack_and_the_task_is_buried_after_its_leases(tmp_path):
    """Unsupervised, as one worker per pod: each crash uses a lease; the next worker buries it."""
    queue = tmp_path / "q"
    runs = tmp_path / "runs"
    enqueue(str(queue), [SegfaultTask(str(runs))])
    first = work(queue, "--lease-seconds", "10", "--max-attempts", "1", "--exit-when-empty")
    assert first.returncode == -11, first.stderr[-2000:]
    assert "Segmentation fault" in first.stderr and "worker_tasks.py" in first.stderr  # faulthandler's stack
    assert "(SegfaultTask, box None) started, attempt 1/1" in first.stderr
    time.sleep(10)  # the dead worker's lease runs out
    second = work(queue, "--lease-seconds", "10", "--max-attempts", "1", "--exit-when-empty")
    assert second.returncode == EXIT_DEAD_LETTERED, second.stderr[-2000:]
    assert runs.read_text().count("\n") == 1
    [record] = FailureLedger.for_queue(str(queue)).dead_records()
    assert record["reason"].startswith("worker died while running it"), record["reason"]
    assert queue_status(str(queue)).failed == 1


def test_payloads_that_cannot_be_rebuilt_go_to_the_dead_letter_without_crashing_the_worker(tmp_path):
    queue = str(tmp_path / "q")
    q = open_queue(queue)
    q.insert([{"class": "NoSuchTask", "x": 1}, {"class": "WriteTask", "bogus": 1}])
    name = next(p for p in (Path(queue) / "queue").rglob("*.json"))
    # And one file that is not JSON at all (a truncated write by some other tool).
    (name.parent / "0--00000000-0000-0000-0000-000000000000--0.json").write_text('{"payload": {"cla')
    enqueue(queue, [WriteTask(str(tmp_path / "good"), "ok")])
    worker = Worker(queue, WorkerOptions(lease_seconds=10, exit_when_empty=True, idle_poll_seconds=0.05,
                                         task_modules=("worker_tasks",)))
    assert worker.run() == EXIT_DEAD_LETTERED
    assert (tmp_path / "good").read_text() == "ok"
    records = FailureLedger.for_queue(queue).dead_records()
    assert len(records) == 3
    assert all(r["reason"].startswith("cannot rebuild the task") for r in records)
    assert any("NoSuchTask" in r["reason"] for r in records)
    status = queue_status(queue)
    assert (status.enqueued, status.completed, status.failed) == (0, 1, 3)


def test_a_task_holding_the_gil_past_its_lease_runs_exactly_once(tmp_path):
    """Lease 10 s, a 24 s C call that holds the GIL: a renewal thread would starve and a second
    worker (started after the first lease ran out) would run the task again."""
    queue = tmp_path / "q"
    out = tmp_path / "out"
    enqueue(str(queue), [GilTask(str(out), "x", 24)])
    cmd = QUEUE_CLI + ["work", str(queue), "--task-module", "worker_tasks", "--exit-when-empty", "--lease-seconds", "10"]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not Path(str(out) + ".runs").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(12)  # the first lease would have run out by now
    second = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [p.communicate(timeout=90)[1] for p in (first, second)]
    assert Path(str(out) + ".runs").read_text().count("\n") == 1, logs
    assert out.read_text() == "x"
    assert queue_status(str(queue)).completed == 1


def test_a_lost_lease_makes_the_worker_abandon_its_task(tmp_path):
    """Another worker takes the task (here: its lease file is renamed, as a lease by another worker
    after expiry would); the keeper's next renewal finds the name gone, and the task stops."""
    queue = tmp_path / "q"
    log = tmp_path / "log"
    enqueue(str(queue), [SleepTask(str(log), 40)])
    proc = subprocess.Popen(QUEUE_CLI + ["work", str(queue), "--task-module", "worker_tasks", "--lease-seconds", "10",
                                         "--max-tasks", "1"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not log.exists() and time.time() < deadline:
        time.sleep(0.1)
    [leased] = list((queue / "queue").rglob("*.json"))
    stolen = leased.with_name("9999999999--" + leased.name.split("--", 1)[1])
    os.rename(leased, stolen)
    _, err = proc.communicate(timeout=60)
    assert "abandoned: its lease was lost" in err, err[-3000:]
    assert "done" not in log.read_text()
    assert stolen.exists()  # the task is left to the worker that holds it now
    assert queue_status(str(queue)).completed == 0


def test_a_gil_holding_task_whose_lease_is_lost_is_stopped_by_killing_its_worker(tmp_path):
    """The task cannot be interrupted while its C call holds the GIL, so the keeper kills the
    worker: the task never completes beside the worker that holds its lease now."""
    queue = tmp_path / "q"
    out = tmp_path / "out"
    enqueue(str(queue), [GilTask(str(out), "x", 40, deaf=True)])
    proc = subprocess.Popen(QUEUE_CLI + ["work", str(queue), "--task-module", "worker_tasks", "--lease-seconds", "10"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not Path(str(out) + ".runs").exists() and time.time() < deadline:
        time.sleep(0.1)
    [leased] = list((queue / "queue").rglob("*.json"))
    os.rename(leased, leased.with_name("9999999999--" + leased.name.split("--", 1)[1]))
    started = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -9, err[-3000:]
    assert time.time() - started < 25  # not the 40 s of the task
    assert "killing it" in err and not out.exists()


def test_leases_shorter_than_10_seconds_are_refused_with_one_line(tmp_path):
    enqueue(str(tmp_path / "q"), [WriteTask(str(tmp_path / "out"), "x")])
    for value in ("0", "1", "9", "-5"):
        done = work(tmp_path / "q", "--lease-seconds", value, "--exit-when-empty")
        assert done.returncode == 2, (value, done.stderr)
        assert "--lease-seconds" in done.stderr and "at least 10" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_create_queue_and_heartbeat(tmp_path):
    fresh = tmp_path / "fresh"
    done = work(fresh, "--exit-when-empty")
    assert done.returncode == 2 and "--create-queue" in done.stderr
    beat = tmp_path / "beat"
    done = work(fresh, "--exit-when-empty", "--create-queue", "--heartbeat", str(beat), "--processes", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert beat.exists() and abs(json.loads(beat.read_text())["time"] - time.time()) < 60
    assert queue_status(str(fresh)).enqueued == 0


def test_heartbeat_is_rewritten_while_a_gil_holding_task_runs(tmp_path):
    queue = tmp_path / "q"
    beat = tmp_path / "beat"
    enqueue(str(queue), [GilTask(str(tmp_path / "out"), "x", 25)])
    proc = subprocess.Popen(QUEUE_CLI + ["work", str(queue), "--task-module", "worker_tasks", "--exit-when-empty",
                                         "--lease-seconds", "10", "--heartbeat", str(beat)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "out.runs").exists() and time.time() < deadline:
        time.sleep(0.1)
    times = set()
    for _ in range(4):
        time.sleep(5)
        times.add(beat.stat().st_mtime)
    proc.communicate(timeout=60)
    assert len(times) >= 2  # rewritten during the 25 s the task held the GIL


def test_no_empty_or_movement_files_are_left_when_a_lease_races_a_delete(tmp_path):
    """Upstream's lease opens the task's movement file before renaming the task; when another
    worker deleted the task in between, an empty movement file is left behind."""
    queue = str(tmp_path / "q")
    enqueue(queue, [WriteTask(str(tmp_path / f"out{i}"), "x") for i in range(20)])
    a, b = FileQueue(queue), FileQueue(queue)
    a._cursor = b._cursor
    first = a.lease(10)  # a lists the shard and keeps the listing
    while (lease := b.lease(10)) is not None:  # b takes and deletes everything, a's listing goes stale
        b.delete(lease)
    a.delete(first)
    assert a.lease(10) is None
    assert FileQueue(queue).is_empty()
    leftovers = [p for p in Path(queue).rglob("*") if p.is_file() and p.stat().st_size == 0]
    assert leftovers == [] and not (Path(queue) / "movement").exists()


def test_dead_letter_commands_list_show_requeue_and_purge(tmp_path):
    queue = str(tmp_path / "q")
    q = open_queue(queue)
    q.insert([{"class": "NoSuchTask", "x": i} for i in range(3)])
    Worker(queue, WorkerOptions(lease_seconds=10, exit_when_empty=True, idle_poll_seconds=0.05)).run()
    run = lambda *a: subprocess.run(QUEUE_CLI + list(a), env=ENV, capture_output=True, text=True)  # noqa: E731
    listed = run("dead-letters", "list", queue, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 3 and all(r["class"] == "NoSuchTask" and "cannot rebuild" in r["reason"] for r in rows)
    shown = run("dead-letters", "show", queue, rows[0]["id"])
    assert shown.returncode == 0 and '"class": "NoSuchTask"' in shown.stdout and "reason: cannot rebuild" in shown.stdout
    assert run("dead-letters", "show", queue, "no-such-id").returncode == 2
    assert run("dead-letters", "requeue", queue).returncode == 2  # ids or --all
    assert run("dead-letters", "requeue", queue, rows[0]["id"]).returncode == 0
    status = queue_status(queue)
    assert (status.enqueued, status.failed, status.retrying) == (1, 2, 0)
    assert FileQueue(queue).read(rows[0]["id"]) is not None  # back under its own id, attempts reset
    assert run("dead-letters", "requeue", queue, "--all").returncode == 0
    assert (queue_status(queue).enqueued, queue_status(queue).failed) == (3, 0)
    Worker(queue, WorkerOptions(lease_seconds=10, exit_when_empty=True, idle_poll_seconds=0.05)).run()
    assert run("dead-letters", "purge", queue).stdout.startswith("removed 3 dead letters")
    assert queue_status(queue).failed == 0
    assert run("purge", queue).returncode == 0


def _deaf_child() -> int:
    """A child that ignores SIGTERM, as a keeper blocked on a lock inherited through fork does."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
        os._exit(0)
    return pid


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_a_keeper_deaf_to_sigterm_is_killed_instead_of_hanging_its_worker():
    from exaconnect.services.worker import _stop_keeper

    pid = _deaf_child()
    started = time.monotonic()
    _stop_keeper(pid, grace_seconds=0.5)
    assert time.monotonic() - started < 5 and _reaped(pid)


def test_a_keeper_that_stopped_going_round_its_loop_is_replaced(tmp_path):
    from exaconnect.services.worker import KEEPER_STALL_SECONDS, LeaseSlot, _stop_keeper

    queue = FileQueue(str(tmp_path / "q"), create=True)
    slot = LeaseSlot()
    worker = Worker(str(tmp_path / "q"), WorkerOptions(lease_seconds=30), slot)
    worker._ledger_root = str(tmp_path / "q")
    wedged = _deaf_child()
    slot._keeper_beat.value = time.time() - KEEPER_STALL_SECONDS - 1
    fresh = worker._check_keeper(wedged, queue, slot)
    try:
        assert fresh != wedged and _reaped(wedged)
        time.sleep(1.0)
        assert time.time() - slot.keeper_beat < 2  # the new keeper goes round its loop
        assert worker._check_keeper(fresh, queue, slot) == fresh  # and is kept
    finally:
        _stop_keeper(fresh)
