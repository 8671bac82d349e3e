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
  hang         one FFN task sleeps forever             -> ended by --task-timeout each attempt, dead-lettered
  hang-gil     one FFN task holds the GIL forever, deaf to signals -> its lease keeper kills the worker, same
  garble-raw   same-length garbage in an image chunk (still decodes) -> its checksum fails the pyramid's read
  garble-cseg  one flipped bit in a segmentation chunk's packed values -> its checksum fails the mesh's read
  garble-mip   garbage in a derived (mip-1) image chunk -> the read and `layer verify` name it
  compresso    a compresso chunk body garbled so that its decoder segfaults (no checksums) -> the mesh
               task fails naming it; the worker and the runner live
  requeue      an image chunk truncated: dead-lettered; restored, `queue dead-letters requeue`, rerun -> identical
  sigterm-runner SIGTERM to the runner mid-segmentation -> it stops, records where; the rerun -> identical
  concurrent   a second run on the same output while the first runs -> refused (exit 2) naming the holder;
               the first finishes identical

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

SCENARIOS = ("sigkill", "sigterm", "short-lease", "enqueue-twice", "truncate", "corrupt", "delete", "hang", "hang-gil",
             "garble-raw", "garble-cseg", "garble-mip", "compresso", "requeue", "sigterm-runner", "concurrent")
# Damage to a layer between two stages: (the last stage before it, the layer, the mip).
DAMAGE = {"truncate": ("ingest.image", "image", 0), "delete": ("ingest.image", "image", 0),
          "corrupt": ("pyramid.segmentation", "segmentation", 0), "garble-raw": ("ingest.image", "image", 0),
          "garble-cseg": ("pyramid.segmentation", "segmentation", 0), "garble-mip": ("pyramid.image", "image", 1),
          "requeue": ("ingest.image", "image", 0)}
TASK_TIMEOUT = 5.0


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
    from exaconnect.services.runner import RunnerOptions, RunStopped, StageFailed, run_stages

    config = pipeline_config(root / name, model, shape)
    plan = build_plan(config)
    log = root / name / "executions.log"
    os.environ["EXACONNECT_FAULT_LOG"] = str(log)
    os.environ["EXACONNECT_FAULT_SLOW_SECONDS"] = "12" if name == "short-lease" else "0"
    os.environ["EXACONNECT_FAULT_HANG"] = {"hang": "python", "hang-gil": "gil"}.get(name, "")
    os.environ["EXACONNECT_FAULT_HANG_CLASS"] = "SegmentTask"
    os.environ["EXACONNECT_FAULT_HANG_FILE"] = str(root / name / "hang.chosen")
    if name == "compresso":
        return compresso_scenario(root, model, shape, seed)
    options = RunnerOptions(str(root / name / "queues"), f"{plan.output}/pipeline", workers=3, progress=False,
                            max_attempts=2 if name.startswith("hang") else 4,
                            lease_seconds=10 if name == "short-lease" else 60,
                            task_timeout_seconds=TASK_TIMEOUT if name.startswith("hang") else None,
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
    injected = None  # when the fault was injected (time.time())
    watcher = None
    try:
        if name in DAMAGE:
            # Run up to the stage whose input is damaged, damage it, then run the rest.
            cut, layer_name, mip = DAMAGE[name]
            head = stages[: [s.name for s in stages].index(cut) + 1]
            run_stages(head, options)
            damaged_layer = plan.layers[layer_name]
            victim, good = _damage(name, damaged_layer, mip, seed)
            injected = time.time()
            faults = 1
            result["damaged_chunk"] = str(victim.relative_to(Path(local_path(damaged_layer)).parent))
            if name == "garble-mip":
                result.update(_read_derived(damaged_layer, mip))
                result["finished"] = False
            elif name == "requeue":
                _run_expecting_failure(stages, options, result)
                victim.write_bytes(good)  # repaired; the dead letters go back to the queue
                result["requeued"] = _requeue_all(config)
                run_stages(stages, options)
                result["finished"] = True
            else:
                run_stages(stages, options)
                result["finished"] = True
        else:
            if name in ("sigterm-runner", "concurrent"):
                watcher = _FirstExecution(log, name, root, model, shape)
                watcher.start()
            run_stages(stages, options)
            result["finished"] = True
    except StageFailed as exc:
        result["finished"] = False
        result["stopped_at"] = str(exc).split(":", 1)[0]
    except RunStopped as exc:
        result["finished"] = False
        result["stopped_by"] = str(exc)[:200]
    except Exception as exc:  # an InputError: a stage refused its input
        result["finished"] = False
        result["refused"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        detected = time.time()
        if chaos is not None:
            chaos.stop.set()
            chaos.join()
            faults = chaos.sent
        if watcher is not None:
            watcher.join(120)
            faults, injected = 1, watcher.injected
            result.update(watcher.result)
    if name.startswith("hang"):
        hang_file = Path(os.environ["EXACONNECT_FAULT_HANG_FILE"])
        injected = hang_file.stat().st_mtime if hang_file.exists() else None
        faults = int(hang_file.exists())
    if name == "sigterm-runner" and "stopped_by" in result:
        result["detect_seconds"] = round(detected - injected, 1) if injected else None
        run_stages(stages, options)  # the rerun resumes where it stopped
        result["finished"] = True
    elif injected is not None and "detect_seconds" not in result:
        result["detect_seconds"] = round((result.pop("detected_at", None) or detected) - injected, 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["faults_injected"] = faults
    result.update(task_totals(config))
    executions = Counter(line.split(" ", 2)[0] + line.split(" ", 2)[1] for line in log.read_text().splitlines()) if log.exists() else Counter()
    result["max_executions_of_one_task"] = max(executions.values(), default=0)
    if result["finished"] and reference is not None:
        result["identical_to_undisturbed"] = same(outcome(config), reference)
    if damaged_layer is not None:
        mip = DAMAGE[name][2]
        report = verify_layer(damaged_layer, mips=[mip])["mips"][0]
        result["verify"] = {"missing": report["missing"], "damaged": [d["chunk"] for d in report["damaged"]]}
    result["passed"] = bool(_passed(name, result, damaged_layer))
    return result


def _passed(name: str, result: dict, damaged_layer: str | None) -> bool:
    identical = result.get("identical_to_undisturbed", False)
    chunk = result.get("damaged_chunk", "").split("/")[-1]
    reasons = " ".join(result.get("reasons", []))
    if name in ("requeue", "sigterm-runner"):
        return result["finished"] and identical and result["left"] == 0 and result["dead_lettered"] == 0
    if name == "concurrent":
        return result["finished"] and identical and result.get("second_exit") == 2 and \
            "another run holds" in result.get("second_said", "")
    if name.startswith("hang"):
        return not result["finished"] and result["dead_lettered"] == 1 and "timed out" in reasons and result["left"] == 0
    if name == "garble-mip":
        return "checksum" in result.get("read_error", "") and chunk in result.get("read_error", "") and \
            [d.split("/")[-1] for d in result["verify"]["damaged"]] == [chunk]
    if name in ("garble-raw", "garble-cseg"):
        return not result["finished"] and result["dead_lettered"] >= 1 and chunk in reasons and "checksum" in reasons \
            and result["left"] == 0
    if result["finished"]:
        return identical
    passed = damaged_layer is not None and (result["dead_lettered"] > 0 or "refused" in result)
    return passed and result["left"] == 0 or (passed and "refused" in result)


def _chunk_files(layer: str, mip: int) -> list[Path]:
    import re

    from exaconnect.precomputed.layers import local_path, open_layer

    key = open_layer(layer).info["scales"][mip]["key"]
    folder = Path(local_path(layer)) / key
    return sorted(p for p in folder.iterdir() if re.fullmatch(r"\d+-\d+_\d+-\d+_\d+-\d+(\.gz)?", p.name))


def _flip_packed_value(data: bytes) -> bytes:
    """One bit of a compressed_segmentation chunk's packed values flipped: still structurally sound."""
    words = np.frombuffer(data, dtype="<u4").copy()
    start = int(words[0])  # channel 0's offset
    for block in range(0, (len(words) - start) // 2):
        header = words[start + 2 * block: start + 2 * block + 2]
        if int(header[0]) >> 24 > 0:
            words[start + int(header[1])] ^= 0x1
            return words.tobytes()
    raise RuntimeError("no block with packed values to flip")


def _damage(name: str, layer: str, mip: int, seed: int) -> tuple[Path, bytes]:
    chunks = _chunk_files(layer, mip)
    rng = random.Random(seed)
    victim = rng.choice(chunks)
    if name == "garble-cseg":  # a chunk with more than one label, so that it has packed values
        victim = next(c for c in rng.sample(chunks, len(chunks)) if _flippable(c))
    data = victim.read_bytes()
    if name in ("truncate", "requeue"):
        victim.write_bytes(data[: len(data) // 3])
    elif name == "corrupt":
        victim.write_bytes(np.random.default_rng(seed).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif name in ("garble-raw", "garble-mip"):
        garbled = bytearray(data)
        middle = len(garbled) // 2
        garbled[middle: middle + 64] = np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8).tobytes()
        victim.write_bytes(bytes(garbled))
    elif name == "garble-cseg":
        victim.write_bytes(_flip_packed_value(data))
    else:
        victim.unlink()
    return victim, data


def _flippable(chunk: Path) -> bool:
    try:
        _flip_packed_value(chunk.read_bytes())
        return True
    except (RuntimeError, IndexError):
        return False


def _read_derived(layer: str, mip: int) -> dict:
    """Read the whole mip as a stage would: a damaged chunk must fail the read, by name."""
    from exaconnect.precomputed.layers import open_layer

    vol = open_layer(layer, mip=mip)
    try:
        vol[vol.bounds]
    except Exception as exc:
        return {"read_error": f"{type(exc).__name__}: {str(exc)[:300]}", "detected_at": time.time()}
    return {"read_error": ""}


def _run_expecting_failure(stages, options, result: dict) -> None:
    from exaconnect.services.runner import StageFailed, run_stages

    try:
        run_stages(stages, options)
        result["first_run"] = "finished (the damage went unnoticed)"
    except StageFailed as exc:
        result["first_run"] = str(exc)[:200]
        result["detected_at"] = time.time()


def _requeue_all(config) -> int:
    """`exaconnect queue dead-letters requeue QUEUE --all` on every service queue with dead letters."""
    from exaconnect.cli import main as cli
    from exaconnect.services.queue import queue_status
    from exaconnect.services.runner import service_queue
    from exaconnect.services.stages import services

    count = 0
    for service in services():
        queue = service_queue(os.path.abspath(config.queue_root), service)
        if Path(queue).exists() and queue_status(queue).failed:
            count += queue_status(queue).failed
            if cli(["queue", "dead-letters", "requeue", queue, "--all"]) != 0:
                raise RuntimeError(f"requeue on {queue} failed")
    return count


class _FirstExecution(threading.Thread):
    """Waits for the first instrumented (FFN) task to start, then injects the fault: SIGTERM to
    this process (the runner), or a second run of the same pipeline in another process."""

    def __init__(self, log: Path, name: str, root: Path, model: str, shape: int) -> None:
        super().__init__(daemon=True)
        self.log, self.name, self.root, self.model, self.shape = log, name, root, model, shape
        self.injected: float | None = None
        self.result: dict = {}

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while not (self.log.exists() and self.log.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.injected = time.time()
        if self.name == "sigterm-runner":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        import subprocess

        second = subprocess.run([sys.executable, __file__, "--second-run", str(self.root), self.name, self.model,
                                 str(self.shape)], capture_output=True, text=True, timeout=600)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        self.result = {"second_exit": second.returncode, "second_said": lines[-1][:300] if lines else "",
                       "detect_seconds": round(time.time() - self.injected, 1)}


def second_run(root: Path, name: str, model: str, shape: int) -> int:
    """The other process of the `concurrent` scenario: the same run, started while the first runs."""
    from exaconnect.errors import ExaconnectError
    from exaconnect.pipeline import build_plan
    from exaconnect.services.runner import RunnerOptions, run_stages

    config = pipeline_config(root / name, model, shape)
    plan = build_plan(config)
    options = RunnerOptions(str(root / name / "queues"), f"{plan.output}/pipeline", workers=3, progress=False,
                            max_attempts=4, task_modules=("fault_instrument",))
    try:
        run_stages(plan.stages, options)
    except ExaconnectError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def decoder_crashes(data: bytes, helpers: int = 5) -> bool:
    """Whether compresso's decoder crashes on `data` as the workers decode a chunk no checksum
    vouches for (in a child forked from a helper's pristine state: precomputed/isolated_decode.py),
    in each of `helpers` fresh helpers. Where out-of-bounds garbage lands depends on the address
    layout, which differs between processes: only garbles that crash every helper tried are
    taken, so that the workers' own helpers crash on them too."""
    from exaconnect.precomputed.chunks import DamagedChunkError
    from exaconnect.precomputed.isolated_decode import decode_compresso_isolated, restart_helper

    for _ in range(helpers):
        restart_helper()
        try:
            decode_compresso_isolated(data, (1, 1, 1, 1), np.uint64, "probe")
        except DamagedChunkError as exc:
            if "decoder crashed" in str(exc):
                continue
        return False
    return True


def compresso_scenario(root: Path, model: str, shape: int, seed: int) -> dict:
    """The mesh stages on a compresso copy of the sample's labels, one chunk garbled so that
    compresso's decoder segfaults on it, read without checksums (the helper-process decode is
    what stands between the worker and the crash)."""
    from exaconnect.pipeline import _synthetic_source
    from exaconnect.services.ingest import IngestOptions, ingest_now
    from exaconnect.services.mesh import MeshForge, mesh_stages
    from exaconnect.services.runner import RunnerOptions, StageFailed, run_stages

    config = pipeline_config(root / "compresso", model, shape)
    _, labels = _synthetic_source(config, str(root / "compresso" / "data"))
    layer = root / "compresso" / "data" / "labels_compresso"
    ingest_now(labels, str(layer), IngestOptions("segmentation", voxel_offset=(5, 3, 7), chunk_size=(16, 16, 16),
                                                 encoding="compresso", overwrite=True), progress=False)
    result: dict = {"scenario": "compresso", "faults_injected": 0}
    victim = None
    for chunk in _chunk_files(str(layer), 0):
        data = chunk.read_bytes()
        for attempt in range(30):
            rng = np.random.default_rng(seed * 1000 + attempt)
            garbled = bytearray(data)
            if len(garbled) < 200:
                break
            at = 36 + int(rng.integers(0, len(garbled) - 100))
            garbled[at: at + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
            if decoder_crashes(bytes(garbled)):
                chunk.write_bytes(bytes(garbled))
                victim = chunk
                break
        if victim is not None:
            break
    if victim is None:
        result.update(passed=False, finished=False, note="no garble crashed the decoder")
        return result
    result["faults_injected"] = 1
    result["damaged_chunk"] = f"{victim.parent.name}/{victim.name}"
    queues = root / "compresso" / "queues"
    previous = os.environ.get("EXACONNECT_VERIFY_CHECKSUMS")
    os.environ["EXACONNECT_VERIFY_CHECKSUMS"] = "0"
    injected = started = time.time()
    try:
        run_stages(mesh_stages(MeshForge(layer=str(layer), shape=(32, 32, 32))),
                   RunnerOptions(str(queues), str(root / "compresso" / "record"), workers=3, progress=False,
                                 max_attempts=2))
        result["finished"] = True
    except StageFailed as exc:
        result["finished"] = False
        result["stopped_at"] = str(exc).split(":", 1)[0]
    finally:
        os.environ.pop("EXACONNECT_VERIFY_CHECKSUMS", None) if previous is None else \
            os.environ.__setitem__("EXACONNECT_VERIFY_CHECKSUMS", previous)
    result["detect_seconds"] = round(time.time() - injected, 1)
    result["seconds"] = round(time.time() - started, 1)
    from exaconnect.services.queue import FailureLedger, queue_status

    status = queue_status(str(queues / "mesh"))
    reasons = [str((r.get("failures") or [{}])[-1].get("error", "")).strip().splitlines()[-1][:300]
               for r in FailureLedger.for_queue(str(queues / "mesh")).dead_records()]
    result.update(completed=status.completed, dead_lettered=status.failed, left=status.enqueued, reasons=reasons)
    result["passed"] = bool(not result["finished"] and status.failed >= 1 and status.enqueued == 0 and
                            any(victim.name in r and "decoder" in r for r in reasons))
    return result


def table(results: list[dict]) -> str:
    """The fault table: fault, tasks, completed, dead-lettered, outcome, time to detection."""
    rows = [("fault", "tasks", "completed", "dead-lettered", "outcome", "detected after s")]
    for r in results:
        outcome = ("finished, identical" if r.get("finished") and r.get("identical_to_undisturbed") else
                   "finished" if r.get("finished") else
                   f"stopped at {r['stopped_at']}" if r.get("stopped_at") else
                   "refused" if r.get("refused") else "read refused" if r.get("read_error") else "stopped")
        outcome += "" if r.get("passed", True) else " (FAILED)"
        tasks = r.get("completed", 0) + r.get("dead_lettered", 0) + r.get("left", 0)
        rows.append((r["scenario"], str(tasks), str(r.get("completed", "")), str(r.get("dead_lettered", "")), outcome,
                     "" if r.get("detect_seconds") is None else str(r["detect_seconds"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--shape", type=int, default=64, help="synthetic sample edge (voxels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--second-run", nargs=4, metavar=("ROOT", "NAME", "MODEL", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.second_run:
        root, name, model, shape = args.second_run
        return second_run(Path(root), name, model, int(shape))
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
    print(table(results), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "faults", "shape": args.shape, "workdir": str(root),
                      "all_passed": all(r["passed"] for r in results[1:]), "runs": results}))
    return 0 if all(r["passed"] for r in results[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
