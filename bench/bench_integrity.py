"""Cost of checking every chunk read against its recorded checksum (issue 24, item 4).

FIB-25 training_sample2 (250^3) is ingested as an image layer (the PNG sections) and a label
layer (groundtruth.h5, compressed_segmentation), 64^3 chunks, each with checksum manifests.
Then, verification on and off alternating (`--repeats` each, fresh copies of the layer for
every downsample run since it writes mips), one process:

- downsample: igneous DownsampleTasks (2,2,2, two mips) of the image layer, run through their
  registered function as a worker runs them (so the derived mips get manifests too);
- mesh: igneous MeshTasks (forge, 128^3 boxes) of the label layer.

Reported: chunks checked, ms per chunk inside the check (MD5 + manifest lookup, timed around
the check itself), that time as % of each stage, and each stage's median wall time on and off.

    .venv/bin/python bench/bench_integrity.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, require_fib25  # noqa: E402


def _run_tasks(tasks) -> None:
    """As a worker does: each task rebuilt from its payload, so igneous's registered functions
    (and our wrapper of DownsampleTask) run."""
    from taskqueue.queueables import totask

    for task in tasks:
        made = totask(task) if not hasattr(task, "execute") else task
        payload = made.payload()
        totask({"payload": list(payload) if isinstance(payload, tuple) else payload, "id": "bench"}).execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fib25 = require_fib25()

    import exaconnect.precomputed.checksums as checksums
    from exaconnect.precomputed.chunks import install_chunk_guard
    from exaconnect.services.downsample import create_downsample_tasks
    from exaconnect.services.ingest import IngestOptions, ingest_now
    from exaconnect.services.mesh import create_mesh_forge_tasks

    install_chunk_guard()
    checksums.checksum_downsample_output()
    calls = {"n": 0, "s": 0.0}
    # The chunk guard looks `check_chunk_status` up at each read: timed here, around the check alone.
    original = checksums.check_chunk_status

    def timed_check(cloudpath, chunk, content):
        start = time.perf_counter()
        try:
            return original(cloudpath, chunk, content)
        finally:
            calls["s"] += time.perf_counter() - start
            calls["n"] += 1

    checksums.check_chunk_status = timed_check

    root = Path(tempfile.mkdtemp(prefix="bench-integrity-"))
    try:
        chunk = (64, 64, 64)
        ingest_now(str(fib25 / "grayscale_maps"), str(root / "image"), IngestOptions(chunk_size=chunk), progress=False)
        ingest_now(f"{fib25 / 'groundtruth.h5'}:stack", str(root / "labels"),
                   IngestOptions("segmentation", chunk_size=chunk), progress=False)
        stages = {"downsample": [], "mesh": []}
        for repeat in range(args.repeats):
            for enabled in (True, False) if repeat % 2 == 0 else (False, True):
                checksums.set_checksum_verification(enabled)
                checksums.forget_cached_manifests()
                # downsample on a fresh copy (it adds mips and writes their chunks)
                copy = root / f"image-{repeat}-{int(enabled)}"
                shutil.copytree(root / "image", copy)
                tasks = create_downsample_tasks(str(copy), num_mips=2, factor=(2, 2, 2), memory_target=int(64e6))
                calls.update(n=0, s=0.0)
                start = time.perf_counter()
                _run_tasks(tasks)
                stages["downsample"].append((enabled, time.perf_counter() - start, calls["n"], calls["s"]))
                shutil.rmtree(copy)
                # mesh forge (writes fragments under mesh/; the labels are only read)
                tasks = create_mesh_forge_tasks(str(root / "labels"), shape=(128, 128, 128))
                calls.update(n=0, s=0.0)
                start = time.perf_counter()
                _run_tasks(tasks)
                stages["mesh"].append((enabled, time.perf_counter() - start, calls["n"], calls["s"]))
        figures = {}
        for name, runs in stages.items():
            on = [r for r in runs if r[0]]
            off = [r for r in runs if not r[0]]
            chunks = on[0][2]
            check_s = statistics.median(r[3] for r in on)
            wall_on = statistics.median(r[1] for r in on)
            wall_off = statistics.median(r[1] for r in off)
            figures[name] = {"chunks_checked": chunks,
                             "ms_per_chunk": round(1000 * check_s / max(chunks, 1), 3),
                             "check_percent_of_stage": round(100 * check_s / wall_on, 2),
                             "stage_s_verify_on": round(wall_on, 3), "stage_s_verify_off": round(wall_off, 3),
                             "wall_delta_percent": round(100 * (wall_on - wall_off) / wall_off, 2),
                             "checked_when_off": max(r[2] for r in off)}
        emit("integrity_on_read", repeats=args.repeats, layer="fib25 training_sample2 250^3, 64^3 chunks",
             **figures)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
