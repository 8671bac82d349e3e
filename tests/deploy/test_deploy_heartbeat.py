"""Issue 23: the worker's heartbeat reflects its task and its progress, so the liveness probe
(deploy/healthcheck.sh, the chart's and the image's) can tell a stuck worker from a busy one."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEALTHCHECK = ROOT / "deploy" / "healthcheck.sh"


def _beating_worker(tmp_path: Path, tasks: list, *flags: str) -> tuple[subprocess.Popen, Path]:
    """A worker on a queue of `tasks` that writes its heartbeat to tmp_path/beat, started now."""
    from conftest import QUEUE_CLI, TASKS_ENV

    from exaconnect.services.queue import open_queue

    queue, beat = tmp_path / "q", tmp_path / "beat"
    open_queue(str(queue), create=True).insert(tasks)
    process = subprocess.Popen(QUEUE_CLI + ["work", str(queue), "--task-module", "worker_tasks", "--exit-when-empty",
                                            "--heartbeat", str(beat), *flags],
                               env=TASKS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, beat


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _watch(process: subprocess.Popen, beat: Path, seconds: float) -> list[dict]:
    seen, deadline = [], time.time() + seconds
    while process.poll() is None and time.time() < deadline:
        record = _read(beat)
        if record and (not seen or record != seen[-1]):
            seen.append(record)
        time.sleep(0.1)
    return seen


def test_heartbeat_names_the_running_task_and_the_probe_judges_it(tmp_path):
    from worker_tasks import SleepTask

    process, beat = _beating_worker(tmp_path, [SleepTask(str(tmp_path / "log"), 4)], "--task-timeout", "60")
    seen = _watch(process, beat, 90)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    running = [r for r in seen if r["task"]]
    assert running, seen
    first = running[0]
    assert first["pid"] == process.pid and first["task_timeout"] == 60
    assert first["task_started"] == first["progress"], "progress: the task loop last moved when the task started"
    assert seen[-1]["task"] is None and seen[-1]["progress"] >= first["task_started"] + 3.5, "finished: progress moved"
    assert all(set(r) == {"time", "pid", "task", "task_started", "progress", "task_timeout"} for r in seen)

    # the same record, aged, as the probe sees it: healthy while the task is within its timeout,
    # unhealthy past it or when progress is older than the probe's limit
    def probe(record: dict, *limits: str) -> subprocess.CompletedProcess:
        beat.write_text(json.dumps(record))
        return subprocess.run([str(HEALTHCHECK), str(beat), "120", *limits], capture_output=True, text=True)

    now = time.time()
    assert probe({**first, "task_started": now - 50, "progress": now - 50}).returncode == 0
    stuck = probe({**first, "task_started": now - 95, "progress": now - 95})
    assert stuck.returncode == 1 and re.search(f"task {first['task']} has run 9[5-7]s, past its task timeout 60s",
                                               stuck.stderr), stuck.stderr
    still = probe({**first, "task": None, "task_started": None, "progress": now - 300}, "240")
    assert still.returncode == 1 and re.search(r"no progress for 30[0-2]s \(limit 240s\)", still.stderr), still.stderr


def test_a_supervisors_heartbeat_names_its_longest_running_task(tmp_path):
    """With --processes N only the supervisor writes the file: its workers' oldest task."""
    from worker_tasks import SleepTask

    process, beat = _beating_worker(tmp_path, [SleepTask(str(tmp_path / f"log{i}"), 12) for i in range(2)],
                                    "--processes", "2")
    seen = _watch(process, beat, 120)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert {r["pid"] for r in seen} == {process.pid}, "the workers do not write it themselves"
    running = [r for r in seen if r["task"]]
    assert running and all(r["progress"] == r["task_started"] for r in running), seen
