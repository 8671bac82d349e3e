#!/usr/bin/env python3
"""A PBS cluster in a box: a pipeline run through deploy/aurora/pipeline.pbs on this one machine,
compared voxel for voxel with a local run of the same pipeline (`make cluster-demo`).

The job script is executed by bash as PBS would: a PBS_NODEFILE naming HOSTS hosts, PBS_JOBID,
a walltime, `module` as a shell function, deploy/fake/mpiexec starting every rank here with the
local rank, tile mask and CPU list the scripts computed (applied with sched_setaffinity where this
machine has those CPUs), and deploy/fake/local/apptainer running the container's command directly
(no container engine here). The runner (`--workers 0`) and the ranks' worker loops are the real
programs; each rank's output goes to its own log, from which the table of ranks is made.

With --walltime-case the segmentation is then redone (RUN_ARGS=--forget segment) in a job whose
walltime expires while segment tasks run: the workers finish or release their tasks in the grace
period, no lease is left held, and a resubmitted job finishes the run without redoing a finished
task; its result is compared with the local run's again.

Prints the tables and, last, one JSON line of figures (also written to --json)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HOSTS = ("x4102c0s0b0n0", "x4102c1s0b0n0", "x4102c2s0b0n0", "x4102c3s0b0n0")
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?:(\d+) )?\w+ [\w.]+: (.*)$")
STARTED = re.compile(r"^task (\S+) \((.*), box .*\) started, attempt (\d+)/")
DONE = re.compile(r"^task (\S+) \((.*)\) done in")
RELEASED = re.compile(r"^released task (\S+) ")


def exaconnect() -> str:
    return str(Path(sys.executable).parent / "exaconnect")


def say(message: str) -> None:
    print(f"[cluster-demo] {message}", flush=True)


# ---------------------------------------------------------------- the local run and the job

def local_run(pipeline: str, sets: list[str], output: Path, queues: Path, workers: int) -> float:
    """`exaconnect run` with local workers (resumes: a finished run costs seconds)."""
    command = [exaconnect(), "run", pipeline, "--output", str(output), "--queue-root", str(queues),
               "--workers", str(workers), *[a for s in sets for a in ("--set", s)]]
    say("local run: " + " ".join(command))
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"local run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return time.monotonic() - started


class Job:
    """One simulated PBS job of deploy/aurora/pipeline.pbs; its output lines are time-stamped as they come."""

    def __init__(self, number: int, work: Path, env: dict) -> None:
        self.number, self.work, self.env = number, work, env
        self.jobid = f"{number}.aurora-pbs"
        self.lines: list[tuple[float, str]] = []
        self.started = self.ended = 0.0
        self.returncode: int | None = None

    def run(self, timeout: float) -> "Job":
        modules = self.work / "modules.log"
        # `module` is a shell function in a PBS job's shell (Lmod), exported to the job script
        script = (f'module() {{ echo "module $*" >> {modules}; }}\nexport -f module\n'
                  f'exec bash {DEPLOY / "aurora" / "pipeline.pbs"}\n')
        env = dict(self.env, PBS_JOBID=self.jobid)
        log = open(self.work / f"job-{self.number}.log", "w")
        self.started = time.time()
        # its own session: at its end PBS kills whatever of the job is left (as the MoM does)
        process = subprocess.Popen(["bash", "-c", script], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def read() -> None:
            for line in process.stdout:
                self.lines.append((time.time(), line.rstrip("\n")))
                log.write(line)
                log.flush()
                if line.startswith("exaconnect job:") or re.match(r"\[run\] \S+: \d+ tasks in", line):
                    print(f"  job {self.number} +{time.time() - self.started:5.1f}s {line.rstrip()}", flush=True)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            self.returncode = process.wait(timeout=timeout)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
                self.leftover = True
            except ProcessLookupError:
                self.leftover = False
            process.wait()
            reader.join(10)
            log.close()
        self.ended = time.time()
        return self

    def when(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)


def job_env(args, work: Path, nodefile: Path, cpu_bind: str, **more) -> dict:
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ,
               PATH=f"{DEPLOY / 'fake' / 'local'}:{DEPLOY / 'fake'}:{venv_bin}:{os.environ['PATH']}",
               FAKE_LOG=str(work / "log"), FAKE_RANK_LOGS=str(work / "ranks"), PBS_NODEFILE=str(nodefile),
               PBS_O_WORKDIR=str(ROOT), SIF=str(work / "exaconnect-xpu.sif"), PIPELINE=args.pipeline,
               QUEUE_ROOT=f"fq://{work / 'queues'}", OUTPUT=str(work / "output"), LEDGER_DIR=str(work / "ledger"),
               WORKERS_PER_NODE=str(args.ranks), CPU_BIND_LIST=cpu_bind, DEVICE="cpu", BINDS=str(work),
               POLL_SECONDS=str(args.poll_seconds), STALL_SECONDS="900", MODULE_USE="/soft/modulefiles",
               MODULES="apptainer", WALLTIME="01:00:00",
               EXA_STOP_FILE=str(work / "runner.done"))
    for name in ("SERVICES", "STOP_GRACE", "RELEASE_GRACE", "RUN_ARGS", "EXACONNECT_PLUGINS"):
        env.pop(name, None)
    if args.sets:
        env["RUN_ARGS"] = " ".join(f"--set {s}" for s in args.sets)
    env.update(more)
    return env


def machine_cpu_bind(ranks: int) -> str:
    """One CPU per local rank, from the CPUs this process may use (round robin when there are fewer)."""
    cpus = sorted(os.sched_getaffinity(0))
    return ":".join(str(cpus[i % len(cpus)]) for i in range(ranks))


# ---------------------------------------------------------------- what the ranks did

def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def rank_events(work: Path, job: Job) -> list[dict]:
    """Every task start, finish and release in the job's rank logs: {rank, host, local, pid, time, kind, task, name}."""
    events = []
    for path in sorted((work / "ranks").glob(f"{job.number}.*.log")):
        _, host, local, _ = path.name.split(".")
        for line in path.read_text(errors="replace").splitlines():
            m = LOG_LINE.match(line)
            if not m:
                continue
            stamp, pid, message = _epoch(m.group(1)), int(m.group(2) or 0), m.group(3)
            for kind, pattern in (("started", STARTED), ("done", DONE), ("released", RELEASED)):
                hit = pattern.match(message)
                if hit:
                    events.append({"host": host, "local": int(local), "pid": pid, "time": stamp, "kind": kind,
                                   "task": hit.group(1), "name": hit.group(2) if kind != "released" else ""})
    return sorted(events, key=lambda e: e["time"])


def stage_windows(queues: Path) -> list[tuple[float, float, str]]:
    """(start, end, stage) of every finished stage, from the run's records beside its queues."""
    windows = []
    for folder in (queues / "records" / "stages",):
        for path in folder.glob("*.json"):
            if path.name.endswith(".enqueued.json"):
                continue
            record = json.loads(path.read_text())
            if "finished" in record and "seconds" in record:
                windows.append((record["finished"] - record["seconds"], record["finished"], path.stem))
    return sorted(windows)


def stage_of(when: float, windows: list[tuple[float, float, str]]) -> str:
    # a task is done before the runner records its stage finished, and after the stage began
    inside = [(end, name) for start, end, name in windows if start - 1.0 <= when <= end + 0.05]
    return min(inside)[1] if inside else "?"


def rank_table(work: Path, jobs: list[Job], windows) -> list[dict]:
    """One row per rank: host, local rank, tile mask, CPU list, affinity, worker PIDs, stages drained."""
    runs = [json.loads(line) for line in (work / "log" / "apptainer.jsonl").read_text().splitlines()]
    rows: dict[tuple[str, int], dict] = {}
    for run in runs:
        env = run["env"]
        if "PALS_LOCAL_RANKID" not in env:
            continue  # the runner, `exaconnect services`
        key = (env["FAKE_HOST"], int(env["PALS_LOCAL_RANKID"]))
        row = rows.setdefault(key, {"host": key[0], "local": key[1], "rank": int(env["PALS_RANKID"]),
                                    "mask": env.get("ZE_AFFINITY_MASK", ""), "cpus": env.get("EXACONNECT_CPUS", ""),
                                    "affinity": run.get("affinity"), "pids": [], "stages": {}, "tasks": 0})
        row["pids"].append(run["pid"])
    for job in jobs:
        for event in rank_events(work, job):
            if event["kind"] != "done":
                continue
            row = rows[(event["host"], event["local"])]
            stage = stage_of(event["time"], windows)
            row["stages"][stage] = row["stages"].get(stage, 0) + 1
            row["tasks"] += 1
    return [rows[k] for k in sorted(rows)]


def print_rank_table(rows: list[dict]) -> None:
    print(f"{'host':<14} {'rank':>4} {'local':>5} {'tile':>4} {'CPUs':>4} {'pinned':>6} {'workers':>7} "
          f"{'tasks':>5}  stages drained (tasks)")
    for r in rows:
        stages = ", ".join(f"{name} {n}" for name, n in sorted(r["stages"].items()))
        pinned = ",".join(map(str, r["affinity"] or []))
        pids = r["pids"]
        print(f"{r['host']:<14} {r['rank']:>4} {r['local']:>5} {r['mask']:>4} {r['cpus']:>4} {pinned:>6} "
              f"{len(pids):>7} {r['tasks']:>5}  {stages}")
        print(f"{'':<14} PIDs {pids[0]}..{pids[-1]}" if len(pids) > 1 else f"{'':<14} PID {pids[0]}")


# ---------------------------------------------------------------- comparing the results

def layer_folders(output: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(output)) for p in output.rglob("info")
                  if p.is_file() and (p.parent / "info").read_text().lstrip().startswith("{")
                  and "scales" in json.loads(p.read_text()))


def compare_outputs(reference: Path, cluster: Path) -> list[dict]:
    """Every layer of the reference run, every mip, voxel for voxel against the cluster run's."""
    import numpy as np
    from cloudvolume import CloudVolume

    rows = []
    for name in layer_folders(reference):
        if ".staging" in name:
            continue
        info = json.loads((reference / name / "info").read_text())
        for mip in range(len(info["scales"])):
            a = np.asarray(CloudVolume(f"file://{reference / name}", mip=mip, progress=False, fill_missing=True)[:, :, :])
            if not (cluster / name / "info").is_file():
                rows.append({"layer": name, "mip": mip, "shape": list(a.shape[:3]), "identical": False,
                             "differ": "missing"})
                continue
            b = np.asarray(CloudVolume(f"file://{cluster / name}", mip=mip, progress=False, fill_missing=True)[:, :, :])
            same = a.shape == b.shape and bool(np.array_equal(a, b))
            rows.append({"layer": name, "mip": mip, "shape": list(a.shape[:3]), "identical": same,
                         "differ": 0 if same else (int(np.count_nonzero(a != b)) if a.shape == b.shape else "shape")})
        for key in ("mesh", "skeletons"):  # meshes and skeletons: the same files, byte for byte
            if isinstance(info.get(key), str):
                rows.append(compare_files(reference / name / info[key], cluster / name / info[key], f"{name}/{info[key]}"))
    return rows


def compare_files(a: Path, b: Path, label: str) -> dict:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    other = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()) if b.is_dir() else []
    differ = [n for n in names if n not in other or (a / n).read_bytes() != (b / n).read_bytes()]
    differ += [n for n in other if n not in names]
    return {"layer": label, "mip": "-", "shape": [len(names)], "identical": not differ, "differ": len(differ)}


def print_comparison(rows: list[dict]) -> None:
    print(f"{'layer':<26} {'mip':>3} {'voxels/files':>14}  identical")
    for r in rows:
        what = "files" if r["mip"] == "-" else "voxels"
        print(f"{r['layer']:<26} {r['mip']:>3} {'x'.join(map(str, r['shape'])):>14}  "
              f"{'yes' if r['identical'] else 'NO (' + str(r['differ']) + f' {what} differ)'}")


def scores(output: Path) -> dict | None:
    """The evaluation's figures (not the layer URLs in it, which name the output folder)."""
    path = output / "pipeline" / "summary.json"
    found = json.loads(path.read_text()).get("scores") if path.is_file() else None

    def figures(value):
        if isinstance(value, dict):
            return {k: figures(v) for k, v in value.items() if not isinstance(v, str)}
        return value

    return figures(found)


def queue_counts(queues: Path, ledger: Path | None) -> dict[str, dict]:
    from exaconnect.services.queue import queue_status

    out = {}
    for folder in sorted(p for p in queues.iterdir() if (p / "layout.json").is_file()):
        status = queue_status(f"fq://{folder}", str(ledger / folder.name) if ledger else None)
        out[folder.name] = {"inserted": status.inserted, "completed": status.completed, "enqueued": status.enqueued,
                            "leased": status.leased, "dead_lettered": status.failed}
    return out


# ---------------------------------------------------------------- the walltime case

def walltime_case(args, work: Path, first: Job, windows, env_for) -> dict:
    """Redo the segmentation in a job whose walltime expires while segment tasks run, then resubmit."""
    events = rank_events(work, first)
    segment = [w for w in windows if w[2] == "segment.initial"]
    if not segment:
        raise SystemExit("the walltime case needs a segment.initial stage in the pipeline")
    seg_start, seg_end, _ = segment[0]
    first_stage = min(w[0] for w in windows)
    seg_tasks = [e for e in events if e["kind"] == "started" and seg_start <= e["time"] <= seg_end]
    durations = []
    for e in seg_tasks:
        done = next((d for d in events if d["kind"] == "done" and d["task"] == e["task"]), None)
        if done:
            durations.append(done["time"] - e["time"])
    # When the segmentation will run in a job that starts with it: the runner's start-up, then as
    # in the first job. Aim at the second round of tasks (each rank's first one also loads
    # TensorFlow and the model), so that some tasks are done and others run when SIGTERM comes.
    startup = first_stage - first.started
    starts = sorted(e["time"] for e in seg_tasks)
    ranks = len({(e["host"], e["local"]) for e in events})
    second_round = starts[ranks] if len(starts) > ranks else (starts[0] if starts else seg_start + 5.0)
    task = sorted(durations)[len(durations) // 2] if durations else 5.0
    stop_at = int(round(startup + second_round - seg_start + max(1.0, 0.4 * (seg_end - second_round))))
    release_grace = 20
    stop_grace = release_grace + max(6, int(round(task * 0.6)))
    attempts = []
    for attempt in range(3):
        before = queue_counts(work / "queues", work / "ledger")
        walltime = stop_at + stop_grace
        say(f"walltime case: job with walltime {walltime} s (SIGTERM at {stop_at} s, STOP_GRACE={stop_grace}, "
            f"RELEASE_GRACE={release_grace}); segment.initial needs about {seg_end - seg_start:.0f} s here, "
            f"its tasks {task:.1f} s")
        number = 2 + 2 * attempt
        job = Job(number, work, env_for(WALLTIME=f"00:{walltime // 60:02d}:{walltime % 60:02d}",
                                        STOP_GRACE=str(stop_grace), RELEASE_GRACE=str(release_grace),
                                        RUN_ARGS=" ".join([*(f"--set {s}" for s in args.sets), "--forget", "segment"])))
        job.run(timeout=walltime + 120)
        term = job.when("walltime: SIGTERM to the workers")
        events = rank_events(work, job)
        running = _running_at(events, term) if term else []
        attempts.append({"job": job.jobid, "rc": job.returncode, "stop_at": stop_at, "in_flight": len(running)})
        if job.returncode == 124 and running:
            break
        # SIGTERM came before the segmentation or after it: this job measured how a job that starts
        # with the segmentation runs here now; aim again with that
        seg = [e for e in events if e["kind"] == "started" and e["name"] == "SegmentTask"]
        ends = [e["time"] for e in events if e["kind"] == "done" and e["name"] == "SegmentTask"]
        if len(seg) > ranks:
            starts = sorted(e["time"] for e in seg)
            last = max(ends) if ends else starts[-1] + task
            stop_at = int(round(starts[ranks] - job.started + max(1.0, 0.4 * (last - starts[ranks]))))
        else:
            stop_at += max(3, int(task))
        say(f"walltime case: no task was running at the first SIGTERM (rc {job.returncode}); again, SIGTERM at {stop_at} s")
        if job.returncode != 0:  # leave the run finished before the next try
            Job(number + 1, work, env_for()).run(timeout=args.timeout)
    else:
        raise SystemExit(f"the walltime case never caught a running task: {attempts}")
    stopped_queues = queue_counts(work / "queues", work / "ledger")
    second = job.when("second SIGTERM")
    killed = job.when("walltime: SIGKILL")
    in_flight = {e["task"]: e for e in running}
    finished = [e for e in events if e["kind"] == "done" and e["task"] in in_flight and e["time"] >= term]
    released = [e for e in events if e["kind"] == "released" and e["task"] in in_flight]
    done_in_stopped = {e["task"] for e in events if e["kind"] == "done"}

    resubmitted = Job(job.number + 1, work, env_for())
    say(f"walltime case: resubmitted as job {resubmitted.jobid}")
    resubmitted.run(timeout=args.timeout)
    if resubmitted.returncode != 0:
        raise SystemExit(f"the resubmitted job {resubmitted.jobid} failed (exit {resubmitted.returncode}); "
                         f"see {work}/job-{resubmitted.number}.log")
    later = rank_events(work, resubmitted)
    leased_after = {}
    for e in released:
        start = next((s for s in later if s["kind"] == "started" and s["task"] == e["task"]), None)
        leased_after[e["task"]] = round(start["time"] - resubmitted.started, 1) if start else None
    redone = sorted(done_in_stopped & {e["task"] for e in later if e["kind"] == "done"})
    after = queue_counts(work / "queues", work / "ledger")
    completions: dict[str, dict] = {}  # per task kind: what each job did with it
    released_ids = {e["task"] for e in released}
    for label, job_events in (("stopped", events), ("resubmitted", later)):
        for e in job_events:
            if e["kind"] != "done":
                continue
            row = completions.setdefault(e["name"], {"done_before_stop": 0, "finished_in_grace": 0,
                                                      "released": 0, "done_after_resubmit": 0, "done": {}})
            if label == "stopped":
                row["finished_in_grace" if e["task"] in in_flight else "done_before_stop"] += 1
            else:
                row["done_after_resubmit"] += 1
            row["done"][e["task"]] = row["done"].get(e["task"], 0) + 1
    for e in events:
        if e["kind"] == "started" and e["task"] in released_ids:
            completions.setdefault(e["name"], {"done_before_stop": 0, "finished_in_grace": 0, "released": 0,
                                               "done_after_resubmit": 0, "done": {}})["released"] += 1
    for row in completions.values():
        done = row.pop("done")
        row["tasks"], row["done_twice"] = len(done), sum(1 for n in done.values() if n > 1)
    return {
        "attempts": attempts, "walltime_seconds": stop_at + stop_grace, "stop_grace": stop_grace,
        "release_grace": release_grace,
        "first_sigterm_s": round(term - job.started, 1),
        "second_sigterm_s": round(second - job.started, 1) if second else None,
        "sigkill": killed is not None, "stopped_job_rc": job.returncode,
        "stopped_job_seconds": round(job.ended - job.started, 1),
        "in_flight_at_sigterm": sorted(in_flight), "finished_in_grace": sorted(e["task"] for e in finished),
        "released": sorted(e["task"] for e in released),
        "finished_before_stop": len(done_in_stopped) - len(finished),
        "leases_held_after_stop": {q: c["leased"] for q, c in stopped_queues.items() if c["leased"]},
        "resubmitted_rc": resubmitted.returncode, "resubmitted_seconds": round(resubmitted.ended - resubmitted.started, 1),
        "released_leased_after_s": leased_after, "redone": redone, "completions": completions,
        "final_queues": after, "jobs": [job, resubmitted],
    }


def _running_at(events: list[dict], when: float) -> list[dict]:
    """Tasks started before `when` and neither done nor released by then."""
    open_: dict[str, dict] = {}
    for e in events:
        if e["time"] > when:
            break
        if e["kind"] == "started":
            open_[e["task"]] = e
        else:
            open_.pop(e["task"], None)
    return list(open_.values())


def print_walltime(figures: dict) -> None:
    f = figures
    print(f"walltime {f['walltime_seconds']} s: first SIGTERM at {f['first_sigterm_s']} s, second at "
          f"{f['second_sigterm_s']} s, SIGKILL {'sent' if f['sigkill'] else 'not needed'}; job exit {f['stopped_job_rc']} "
          f"after {f['stopped_job_seconds']} s")
    print(f"tasks running at the first SIGTERM: {len(f['in_flight_at_sigterm'])}; finished in the grace period: "
          f"{len(f['finished_in_grace'])}; released to the queue: {len(f['released'])}; "
          f"leases left held: {f['leases_held_after_stop'] or 'none'}")
    waits = [s for s in f["released_leased_after_s"].values() if s is not None]
    print(f"resubmitted job: exit {f['resubmitted_rc']} after {f['resubmitted_seconds']} s; released tasks leased "
          f"{', '.join(f'{s} s' for s in waits) or '-'} after it started; tasks redone: {len(f['redone'])}")
    print(f"{'task':<44} {'tasks':>5} {'done before':>11} {'in grace':>8} {'released':>8} {'resubmitted':>11} "
          f"{'twice':>5}")
    for name, c in sorted(f["completions"].items()):
        print(f"{name:<44} {c['tasks']:>5} {c['done_before_stop']:>11} {c['finished_in_grace']:>8} {c['released']:>8} "
              f"{c['done_after_resubmit']:>11} {c['done_twice']:>5}")


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="configs/demo.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--work", default="data/cluster-demo", help="the cluster run's folder (emptied first)")
    parser.add_argument("--reference-output", help="the local run's output (default WORK/local)")
    parser.add_argument("--reference-queues", help="the local run's queue root (default WORK/local-queues)")
    parser.add_argument("--local-workers", type=int, default=2)
    parser.add_argument("--hosts", type=int, default=2, choices=range(1, len(HOSTS) + 1))
    parser.add_argument("--ranks", type=int, default=2, help="ranks (workers) per host")
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--walltime-case", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one job may take")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    work = (ROOT / args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    for sub in ("log", "ranks"):
        (work / sub).mkdir(parents=True)
    reference = Path(args.reference_output or work / "local").resolve()
    ref_queues = Path(args.reference_queues or work / "local-queues").resolve()
    local_seconds = local_run(args.pipeline, args.sets, reference, ref_queues, args.local_workers)
    say(f"local run: {local_seconds:.1f} s ({reference})")

    (work / "exaconnect-xpu.sif").write_text("")  # the image file must exist, as on a cluster
    nodefile = work / "nodefile"
    nodefile.write_text("".join(f"{h}\n" * args.ranks for h in HOSTS[:args.hosts]))
    cpu_bind = machine_cpu_bind(args.ranks)

    def env_for(**more) -> dict:
        return job_env(args, work, nodefile, cpu_bind, **more)

    say(f"pipeline.pbs on {args.hosts} simulated hosts x {args.ranks} ranks (CPU_BIND_LIST={cpu_bind})")
    first = Job(1, work, env_for()).run(timeout=args.timeout)
    if first.returncode != 0:
        tail = "\n".join(line for _, line in first.lines[-60:])
        raise SystemExit(f"job {first.jobid} failed (exit {first.returncode}):\n{tail}")
    windows = stage_windows(work / "queues")
    rows = rank_table(work, [first], windows)
    print(f"\njob {first.jobid}: {first.ended - first.started:.1f} s, modules: "
          f"{(work / 'modules.log').read_text().split(chr(10))[:-1]}")
    print_rank_table(rows)
    comparison = compare_outputs(reference, work / "output")
    print()
    print_comparison(comparison)
    same_scores = scores(reference) == scores(work / "output")
    print(f"evaluation scores identical: {same_scores}")
    figures = {"local_seconds": round(local_seconds, 1), "job_seconds": round(first.ended - first.started, 1),
               "ranks": [{k: r[k] for k in ("host", "rank", "local", "mask", "cpus", "affinity", "pids", "stages", "tasks")}
                         for r in rows],
               "stages": [w[2] for w in windows], "comparison": comparison, "scores_identical": same_scores,
               "identical": all(r["identical"] for r in comparison) and same_scores,
               "queues": queue_counts(work / "queues", work / "ledger")}
    if args.walltime_case:
        print()
        wall = walltime_case(args, work, first, windows, env_for)
        print_walltime(wall)
        jobs = wall.pop("jobs")
        again = compare_outputs(reference, work / "output")
        wall["identical"] = all(r["identical"] for r in again) and scores(reference) == scores(work / "output")
        wall["comparison"] = again
        wall["ranks"] = [{k: r[k] for k in ("host", "local", "stages", "tasks")}
                         for r in rank_table(work, jobs, stage_windows(work / "queues"))]
        print(f"after the resubmitted job: every layer identical to the local run's: {wall['identical']}")
        figures["walltime"] = wall
    line = json.dumps(figures)
    if args.json:
        Path(args.json).write_text(line)
    print(line)
    return 0 if figures["identical"] and figures.get("walltime", {}).get("identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())
