"""A run for the signal and lock tests, started as a subprocess:

    python reliability_driver.py ROOT WORKERS SECONDS TASKS GRACE

stage `slow` (TASKS NamedSleepTasks of SECONDS each, log ROOT/slow.log), then stage `after`
(one line appended to ROOT/after.log). Exits 128 + the signal when stopped, 2 on other errors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from reliability_tasks import NamedSleepTask  # noqa: E402
from runner_tasks import lines_stage, task_stage  # noqa: E402

from exaconnect.errors import ExaconnectError  # noqa: E402
from exaconnect.services.runner import RunnerOptions, RunStopped, run_stages  # noqa: E402


def main() -> int:
    root, workers, seconds, tasks, grace = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), \
        float(sys.argv[5])
    log = root / "slow.log"
    slow = task_stage("slow", "ingest", lambda: [NamedSleepTask(str(log), f"t{i}", seconds) for i in range(tasks)],
                      seconds=seconds, tasks=tasks)
    after = lines_stage("after", root / "after.log", after=(slow,))
    options = RunnerOptions(str(root / "queues"), str(root / "record"), workers=workers, progress=True,
                            max_attempts=2, lease_seconds=30, grace_seconds=grace,
                            task_modules=("reliability_tasks",))
    print("ready", flush=True)
    try:
        run_stages([slow, after], options)
    except RunStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr, flush=True)
        return 128 + exc.signum
    except ExaconnectError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
