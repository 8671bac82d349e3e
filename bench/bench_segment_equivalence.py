"""The stitch equivalence step at Aurora scale: a synthetic edge list for a grid of ~55,000
subvolumes (the early-science run's task count), solved on one node. Prints one JSON line.

    .venv/bin/python bench/bench_segment_equivalence.py [--grid 44,50,25] [--matches 30] [--objects 2000]

Each cell has `objects` local IDs; each of its +x, +y, +z faces contributes `matches` matched
pairs (the order of what a 256^3 FIB-25 subvolume face carries). Reports the time to build the
map (union-find by sparse connected components), to write it as two .npy files, and to read one
relabel task's slice through a memory map, with the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_edges(grid: tuple[int, int, int], matches: int, objects: int, seed: int = 0) -> np.ndarray:
    from exaconnect.precomputed.stitching import LOCAL_BITS

    rng = np.random.default_rng(seed)
    gx, gy, gz = grid
    cells = np.arange(gx * gy * gz, dtype=np.int64)
    x, y, z = cells % gx, (cells // gx) % gy, cells // (gx * gy)
    parts = []
    for axis, (coordinate, size, stride) in enumerate(((x, gx, 1), (y, gy, gx), (z, gz, gx * gy))):
        lower = cells[coordinate < size - 1]
        upper = lower + stride
        a_task = np.repeat(lower, matches)
        b_task = np.repeat(upper, matches)
        # Distinct local IDs on each side of a face (a face match pairs each object at most
        # once): a random window of `matches` consecutive IDs per face, shuffled on one side.
        a_local = (rng.integers(0, objects - matches + 1, len(lower))[:, None] + np.arange(matches)).ravel() + 1
        b_local = (rng.integers(0, objects - matches + 1, len(lower))[:, None] + rng.permutation(matches)).ravel() + 1
        a = ((a_task + 1).astype(np.uint64) << np.uint64(LOCAL_BITS)) | a_local.astype(np.uint64)
        b = ((b_task + 1).astype(np.uint64) << np.uint64(LOCAL_BITS)) | b_local.astype(np.uint64)
        parts.append(np.stack([a, b], axis=1))
    return np.concatenate(parts)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default="44,50,25", help="subvolumes per axis X,Y,Z (44*50*25 = 55,000)")
    parser.add_argument("--matches", type=int, default=30, help="matched object pairs per face")
    parser.add_argument("--objects", type=int, default=2000, help="local objects per subvolume")
    args = parser.parse_args()

    from exaconnect.precomputed.stitching import apply_equivalence, equivalence_from_edges, pack_ids, slice_equivalence

    import scipy.sparse.csgraph  # noqa: F401  (import time is not solve time)

    grid = tuple(int(v) for v in args.grid.split(","))
    baseline = rss_mib()
    t0 = time.perf_counter()
    edges = synthetic_edges(grid, args.matches, args.objects)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    after_edges = rss_mib()
    equivalence = equivalence_from_edges(edges)
    t2 = time.perf_counter()
    solved_rss = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "ids.npy", equivalence.ids)
        np.save(Path(tmp) / "roots.npy", equivalence.roots)
        t3 = time.perf_counter()
        ids = np.load(Path(tmp) / "ids.npy", mmap_mode="r")
        roots = np.load(Path(tmp) / "roots.npy", mmap_mode="r")
        task = grid[0] * grid[1] * grid[2] // 2
        part_ids, part_roots = slice_equivalence(ids, roots, task)
        local = np.random.default_rng(1).integers(0, args.objects + 1, (64, 64, 64))
        apply_equivalence(pack_ids(local, task), part_ids, part_roots)
        t4 = time.perf_counter()
        map_bytes = (Path(tmp) / "ids.npy").stat().st_size + (Path(tmp) / "roots.npy").stat().st_size
    components = len(np.unique(equivalence.roots))
    print(json.dumps({
        "benchmark": "segment_equivalence",
        "subvolumes": int(np.prod(grid)),
        "grid": list(grid),
        "edges": int(len(edges)),
        "ids": int(len(equivalence.ids)),
        "components": int(components),
        "largest_component": int(np.unique(equivalence.roots, return_counts=True)[1].max()),
        "generate_s": round(t1 - t0, 2),
        "solve_s": round(t2 - t1, 2),
        "write_map_s": round(t3 - t2, 2),
        "relabel_slice_s": round(t4 - t3, 3),
        "map_mib": round(map_bytes / 2**20, 1),
        "edges_mib": round(edges.nbytes / 2**20, 1),
        "peak_rss_mib": round(rss_mib(), 1),
        "rss_baseline_mib": round(baseline, 1),
        "rss_after_edges_mib": round(after_edges, 1),
        "rss_after_solve_mib": round(solved_rss, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
