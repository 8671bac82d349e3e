"""Fault injection: a real pipeline (ingest -> pyramid -> FFN segmentation with a small model ->
stitching -> mesh -> skeletons -> evaluate) on the built-in sample, run by the stage runner with
several worker processes while faults are injected; after each run the outcome is checked
against an undisturbed run.

Scenarios (each a fresh run):
  sigkill      worker processes SIGKILLed at random moments (they are replaced)
  sigterm      worker processes sent SIGTERM at random moments (they finish their task, exit)
  short-lease  every segment/mesh/skeleton task sleeps past its 10 s lease (renewal must hold)
  enqueue-twice every stage's batch enqueued twice
  truncate     an image chunk truncated after ingest   -> the pyramid stage dead-letters, naming it
  corrupt      a segmentation chunk overwritten with random bytes before meshing -> dead-lettered
  delete       an image chunk deleted after ingest     -> the next stage refuses to start

Pass: final layers voxel-identical to the undisturbed run (meshes and skeletons complete and
loadable), or the damage reported (`layer verify`) and the affected tasks dead-lettered with
their reason; every task completed or dead-lettered; no worker hung; nothing ran in a loop.

    .venv/bin/python bench/bench_faults.py [--scenarios sigkill,corrupt] [--shape 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCENARIOS = ("sigkill", "sigterm", "short-lease", "enqueue-twice", "truncate", "corrupt", "delete")


def pipeline_config(root: Path, model: str, shape: int):
    from exaconnect.pipeline_config import (EvaluateConfig, IngestConfig, LinkConfig, MeshConfig, PipelineConfig,
                                            PyramidConfig, SegmentConfig, SkeletonConfig, SourceConfig)

    return PipelineConfig(
        name="faults", output=str(root / "data"), queue_root=str(root / "queues"), workers=3,
        source=SourceConfig(synthetic_shape=(shape, shape, shape), synthetic_seed=5),
        ingest=IngestConfig(chunk_size=(16, 16, 16)),
        segment=SegmentConfig(model=model, subvolume=(32, 32, 32), overlap=(8, 8, 8)),
        pyramid=PyramidConfig(num_mips=1),
        mesh=MeshConfig(shape=(32, 32, 32)),
        skeletons=SkeletonConfig(shape=(32, 32, 32), dust_threshold=100),
        evaluate=EvaluateConfig(), link=LinkConfig(short=False))


def worker_pids() -> list[int]:
    """Worker processes this process spawned (children and their children)."""
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError):
            continue
    out, todo = [], list(children.get(me, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue
        # Worker processes (and their lease keepers), not multiprocessing's resource tracker.
        if b"spawn_main" in command:
            out.append(pid)
    return out


class Chaos(threading.Thread):
    """Sends `sig` to a random worker process every `low`..`high` seconds, `limit` times."""

    def __init__(self, sig: int, limit: int, low: float = 1.0, high: float = 4.0, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.sig, self.limit, self.low, self.high = sig, limit, low, high
        self.rng = random.Random(seed)
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while self.sent < self.limit and not self.stop.wait(self.rng.uniform(self.low, self.high)):
            pids = worker_pids()
            if pids:
                try:
                    os.kill(self.rng.choice(pids), self.sig)
                    self.sent += 1
                except ProcessLookupError:
                    pass


def layer_arrays(layer: str) -> dict[int, np.ndarray]:
    from exaconnect.precomputed.layers import open_layer

    out = {}
    vol = open_layer(layer)
    for mip in range(len(vol.info["scales"])):
        v = open_layer(layer, mip=mip)
        out[mip] = np.asarray(v[v.bounds])[..., 0]
    return out


def mesh_and_skeleton_check(layer: str) -> dict:
    """Every object's mesh and skeleton load; returns their vertex counts by object."""
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box

    vol = open_layer(layer)
    ids = [int(i) for i in np.unique(read_box(vol, layer_bounds(vol))) if i]
    meshes = vol.mesh.get(ids, fuse=False)
    out = {"objects": len(ids), "meshes": {i: int(len(m.vertices)) for i, m in meshes.items()}}
    skeletons = {}
    for i in ids:
        try:
            skeletons[i] = int(len(vol.skeleton.get(i).vertices))
        except Exception:  # small objects are dust for kimimaro: no skeleton, by design
            continue
    out["skeletons"] = skeletons
    return out


def outcome(config) -> dict:
    from exaconnect.pipeline import build_plan

    plan = build_plan(config)
    return {"segmentation": layer_arrays(plan.layers["segmentation"]), "image": layer_arrays(plan.layers["image"]),
            "objects": mesh_and_skeleton_check(plan.layers["segmentation"])}


def same(a: dict, b: dict) -> bool:
    for key in ("segmentation", "image"):
        if a[key].keys() != b[key].keys() or any(not np.array_equal(a[key][m], b[key][m]) for m in a[key]):
            return False
    return a["objects"] == b["objects"]


def task_totals(config) -> dict:
    """Tasks completed and dead-lettered over every service queue of the run."""
    from exaconnect.services.queue import FailureLedger, queue_status
    from exaconnect.services.runner import service_queue
    from exaconnect.services.stages import services

    completed = dead = left = 0
    reasons = []
    for service in services():
        queue = service_queue(os.path.abspath(config.queue_root), service)
        if not Path(queue).exists():
            continue
        status = queue_status(queue)
        completed += status.completed
        dead += status.failed
        left += status.enqueued
        for record in FailureLedger.for_queue(queue).dead_records():
            failures = record.get("failures") or [{}]
            reasons.append(str(failures[-1].get("error", "")).strip().splitlines()[-1][:500])
    return {"completed": completed, "dead_lettered": dead, "left": left, "reasons": reasons}


def run_scenario(name: str, root: Path, model: str, shape: int, reference: dict | None, seed: int) -> dict:
    from exaconnect.pipeline import build_plan
    from exaconnect.precomputed.layers import local_path
    from exaconnect.precomputed.verify import verify_layer
    from exaconnect.services.runner import RunnerOptions, StageFailed, run_stages

    config = pipeline_config(root / name, model, shape)
    plan = build_plan(config)
    log = root / name / "executions.log"
    os.environ["EXACONNECT_FAULT_LOG"] = str(log)
    os.environ["EXACONNECT_FAULT_SLOW_SECONDS"] = "12" if name == "short-lease" else "0"
    options = RunnerOptions(str(root / name / "queues"), f"{plan.output}/pipeline", workers=3, progress=False,
                            max_attempts=4, lease_seconds=10 if name == "short-lease" else 60,
                            task_modules=("fault_instrument",))
    stages = plan.stages
    if name == "enqueue-twice":
        # Every stage makes each of its tasks twice (the stages are the plan's own objects, which the
        # stages below them require, so the shadowing method is the one the runner calls).
        for stage in stages:
            object.__setattr__(stage, "make_tasks", lambda make=stage.make_tasks: (lambda t: t + t)(list(make())))
    faults = 0
    chaos = None
    if name in ("sigkill", "sigterm"):
        chaos = Chaos(signal.SIGKILL if name == "sigkill" else signal.SIGTERM, limit=6, seed=seed)
        chaos.start()
    damaged_layer = None
    started = time.perf_counter()
    result: dict = {"scenario": name}
    try:
        if name in ("truncate", "corrupt", "delete"):
            # Run up to the stage whose input is damaged, damage it, then run the rest.
            cut = "pyramid.segmentation" if name == "corrupt" else "ingest.image"
            head = stages[: [s.name for s in stages].index(cut) + 1]
            run_stages(head, options)
            damaged_layer = plan.layers["segmentation"] if name == "corrupt" else plan.layers["image"]
            import re

            from exaconnect.precomputed.layers import open_layer

            chunk_root = Path(local_path(damaged_layer))
            key = open_layer(damaged_layer).info["scales"][0]["key"]
            chunks = sorted(p for p in (chunk_root / key).iterdir() if re.fullmatch(r"\d+-\d+_\d+-\d+_\d+-\d+(\.gz)?", p.name))
            victim = random.Random(seed).choice(chunks)
            data = victim.read_bytes()
            if name == "truncate":
                victim.write_bytes(data[: len(data) // 3])
            elif name == "corrupt":
                victim.write_bytes(np.random.default_rng(seed).integers(0, 256, len(data), dtype=np.uint8).tobytes())
            else:
                victim.unlink()
            faults = 1
            result["damaged_chunk"] = str(victim.relative_to(chunk_root.parent))
        run_stages(stages, options)
        result["finished"] = True
    except StageFailed as exc:
        result["finished"] = False
        result["stopped_at"] = str(exc).split(":", 1)[0]
    except Exception as exc:  # an InputError: a stage refused its input
        result["finished"] = False
        result["refused"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        if chaos is not None:
            chaos.stop.set()
            chaos.join()
            faults = chaos.sent
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["faults_injected"] = faults
    result.update(task_totals(config))
    executions = Counter(line.split(" ", 2)[0] + line.split(" ", 2)[1] for line in log.read_text().splitlines()) if log.exists() else Counter()
    result["max_executions_of_one_task"] = max(executions.values(), default=0)
    if result["finished"] and reference is not None:
        result["identical_to_undisturbed"] = same(outcome(config), reference)
    if damaged_layer is not None:
        report = verify_layer(damaged_layer, mips=[0])["mips"][0]
        result["verify"] = {"missing": report["missing"], "damaged": [d["chunk"] for d in report["damaged"]]}
    passed = result.get("identical_to_undisturbed", False) if result["finished"] else (
        damaged_layer is not None and (result["dead_lettered"] > 0 or "refused" in result))
    result["passed"] = bool(passed and result["left"] == 0 or (passed and "refused" in result))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--shape", type=int, default=64, help="synthetic sample edge (voxels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    from conftest import make_tiny_ffn

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_faults_"))
    model = make_tiny_ffn(root / "tiny_ffn")
    from exaconnect.pipeline import build_plan  # noqa: F401  (imports before timing)

    baseline = run_scenario("undisturbed", root, model, args.shape, None, args.seed)
    reference = outcome(pipeline_config(root / "undisturbed", model, args.shape))
    results = [baseline]
    for name in args.scenarios.split(","):
        if name not in SCENARIOS:
            parser.error(f"--scenarios: {name!r} is not one of {SCENARIOS}")
        results.append(run_scenario(name, root, model, args.shape, reference, args.seed))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "faults", "shape": args.shape, "workdir": str(root),
                      "all_passed": all(r["passed"] for r in results[1:]), "runs": results}))
    return 0 if all(r["passed"] for r in results[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
