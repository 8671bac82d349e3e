"""Stitch: subvolume segmentations -> one consistent segmentation layer, in three stages.

1. faces: one task per subvolume matches its objects with those of its +x, +y and +z
   neighbours in their shared overlap and writes the matched pairs (global IDs);
2. equivalence: one task joins every pair into components (union-find) and writes a sorted
   map global ID -> component representative;
3. relabel: one task per subvolume writes its write box (the core, without overlap) into the
   segmentation layer, each local ID packed to its global ID and mapped through the equivalence.

igneous's connected-components tasks have this shape (faces -> equivalence -> relabel); the
difference is that our faces compare two independent segmentations, not touching voxels.
Every stage only reads staging files that carry a completion marker, so no partial subvolume
is ever read, and every task can be rerun.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from taskqueue import RegisteredTask

from exaconnect.errors import LayerError
from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.layers import open_layer, write_box
from exaconnect.precomputed.verify import record_checksums
from exaconnect.precomputed.stitching import (
    apply_equivalence,
    equivalence_from_edges,
    match_objects,
    overlap_table,
    pack_ids,
    slice_equivalence,
)
from exaconnect.services.segment_staging import (
    SegmentRun,
    encode_array,
    equivalence_path,
    faces_path,
    is_complete,
    load_run,
    put_complete,
    read_array,
    read_labels,
)

log = logging.getLogger("exaconnect.stitch")


def _crop(labels: np.ndarray, read: Box, region: Box) -> np.ndarray:
    """The [z, y, x] part of `labels` (covering `read`) that lies in `region`."""
    lo = [r - b for r, b in zip(region.start, read.start)]
    hi = [r - b for r, b in zip(region.stop, read.start)]
    return labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]


def face_edges(run: SegmentRun, pass_name: str, index) -> np.ndarray:
    """Matched global-ID pairs between cell `index` and each of its forward neighbours."""
    grid = run.grid
    labels, read = read_labels(run.staging, pass_name, index)
    own = grid.task_number(index)
    edges = [np.zeros((0, 2), np.uint64)]
    for other in grid.forward_neighbors(index):
        other_labels, other_read = read_labels(run.staging, pass_name, other)
        region = read.intersection(other_read)
        if region.empty():
            continue
        a = pack_ids(_crop(labels, read, region), own)
        b = pack_ids(_crop(other_labels, other_read, region), grid.task_number(other))
        edges.append(match_objects(overlap_table(a, b), run.match))
    return np.concatenate(edges)


class SegmentFacesTask(RegisteredTask):
    """Match one subvolume's objects with its +x, +y, +z neighbours' in the overlaps."""

    def __init__(self, staging: str, pass_name: str, index: list):
        super().__init__(staging, pass_name, [int(i) for i in index])

    def execute(self) -> None:
        path = faces_path(self.pass_name, self.index)
        if is_complete(self.staging, path):
            return
        run = load_run(self.staging)
        edges = face_edges(run, self.pass_name, self.index)
        put_complete(self.staging, path, encode_array(edges), {"edges": int(len(edges))})


def gather_edges(run: SegmentRun, pass_name: str, threads: int = 16) -> np.ndarray:
    """Every face file of the pass, concatenated; a missing one stops the step (and the task
    is retried later) rather than silently leaving its objects unjoined. Files are read by a
    thread pool: on a parallel filesystem this step is bound by per-file latency, not bytes."""
    from concurrent.futures import ThreadPoolExecutor

    def read(index):
        try:
            return read_array(run.staging, faces_path(pass_name, index))
        except LayerError:
            return index

    cells = [c.index for c in run.grid.cells()]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(read, cells))
    missing = [p for p in parts if not isinstance(p, np.ndarray)]
    if missing:
        raise LayerError(f"{run.staging}: face files of pass {pass_name} missing for cells {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; run the segment-faces stage to completion first")
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)


class SegmentEquivalenceTask(RegisteredTask):
    """Join all face matches of a pass into one sorted global ID -> representative map."""

    def __init__(self, staging: str, pass_name: str):
        super().__init__(staging, pass_name)

    def execute(self) -> None:
        if is_complete(self.staging, equivalence_path(self.pass_name, "roots")):
            return
        run = load_run(self.staging)
        started = time.perf_counter()
        edges = gather_edges(run, self.pass_name)
        gathered = time.perf_counter()
        equivalence = equivalence_from_edges(edges)
        solved = time.perf_counter()
        # ids first, roots last: the roots marker is what the relabel stage checks.
        put_complete(self.staging, equivalence_path(self.pass_name, "ids"), encode_array(equivalence.ids))
        put_complete(self.staging, equivalence_path(self.pass_name, "roots"), encode_array(equivalence.roots),
                     {"edges": int(len(edges)), "ids": int(len(equivalence.ids)),
                      "components": int(len(np.unique(equivalence.roots))),
                      "timing": {"gather_s": gathered - started, "solve_s": solved - gathered}})


def relabel_cell(run: SegmentRun, pass_name: str, index) -> tuple[np.ndarray, Box]:
    """Final labels [z, y, x] of one cell's write box."""
    cell = run.grid.cell(index)
    labels, read = read_labels(run.staging, pass_name, index)
    core = pack_ids(_crop(labels, read, cell.write), run.grid.task_number(index))
    roots = read_array(run.staging, equivalence_path(pass_name, "roots"), mmap=True)
    ids = read_array(run.staging, equivalence_path(pass_name, "ids"), mmap=True)
    ids, roots = slice_equivalence(ids, roots, run.grid.task_number(index))
    return apply_equivalence(core, ids, roots), cell.write


class SegmentRelabelTask(RegisteredTask):
    """Write one cell's core into the segmentation layer with global, stitched IDs. Rewriting
    gives the same chunks, so a rerun is harmless."""

    def __init__(self, staging: str, pass_name: str, index: list):
        super().__init__(staging, pass_name, [int(i) for i in index])

    def execute(self) -> None:
        run = load_run(self.staging)
        labels, box = relabel_cell(run, self.pass_name, self.index)
        vol = open_layer(run.segmentation_layer, layer_type="segmentation")
        write_box(vol, box, labels)
        record_checksums(vol, box)  # read back, and kept for `exaconnect layer verify`


def create_faces_tasks(run: SegmentRun, pass_name: str | None = None) -> list[SegmentFacesTask]:
    name = pass_name or run.final_pass
    run.pass_spec(name)
    return [SegmentFacesTask(run.staging, name, list(c.index)) for c in run.grid.cells()]


def create_equivalence_tasks(run: SegmentRun, pass_name: str | None = None) -> list[SegmentEquivalenceTask]:
    name = pass_name or run.final_pass
    run.pass_spec(name)
    return [SegmentEquivalenceTask(run.staging, name)]


def create_relabel_tasks(run: SegmentRun, pass_name: str | None = None) -> list[SegmentRelabelTask]:
    name = pass_name or run.final_pass
    run.pass_spec(name)
    return [SegmentRelabelTask(run.staging, name, list(c.index)) for c in run.grid.cells()]
