"""Segment: FFN inference over overlapping subvolumes, one task per subvolume.

Each task reads its read box (write box plus overlap) from the image layer, runs the FFN and
writes the subvolume's local labels to its own staging file (see `segment_staging`). Nothing
is shared between tasks and IDs need no coordination: stitching later packs the task number
into the high bits of every local ID. The stitch stages (`services/stitch.py`) then match
objects across faces, build the global equivalence and relabel into the segmentation layer.

Passes: the first pass segments the image; a refinement pass (another model, or the same
model with seeds visited in reverse order) runs per subvolume again and is combined with an
earlier pass by oversegmentation consensus, all before stitching, so that
"initial -> refinement -> final" is three queue stages over the same grid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import replace

import numpy as np
from taskqueue import RegisteredTask

from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.bbox import Box, Triple, require_inside
from exaconnect.precomputed.layers import (
    LayerSpec,
    Provenance,
    create_layer,
    layer_bounds,
    layer_url,
    open_layer,
    read_box,
)
from exaconnect.precomputed.stitching import MatchOptions, split_consensus
from exaconnect.services.segment_staging import (
    MANIFEST,
    PassSpec,
    SegmentGrid,
    SegmentRun,
    default_staging,
    encode_labels,
    is_complete,
    labels_path,
    load_run,
    put_complete,
    read_labels,
    save_run,
    store,
)

log = logging.getLogger("exaconnect.segment")


@functools.lru_cache(maxsize=2)
def _predictor(model: str, overrides_json: str):
    """One loaded network per worker process and model: loading the 12-layer FIB-25 net costs
    seconds, a subvolume's inference minutes, and a worker runs many subvolumes."""
    from exaconnect.ffn.predictor import load_model

    return load_model(model, config_overrides=json.loads(overrides_json) or None, device="auto")


def pass_options(predictor, spec: PassSpec):
    """The InferenceOptions of a pass; 'reverse' visits the seed points last-first, which
    changes which object claims contested voxels."""
    return replace(predictor.config.inference, seed_order=spec.seed_order)


def segment_image(image_zyx: np.ndarray, spec: PassSpec) -> tuple[np.ndarray, dict]:
    """Local labels (uint32, 0 = unsegmented) of one subvolume under one pass, and counters."""
    from exaconnect.ffn.inference import segment_subvolume

    predictor = _predictor(spec.model, json.dumps(spec.inference, sort_keys=True))
    fov = np.array(predictor.model_config.fov_zyx)
    options = pass_options(predictor, spec)
    if np.any(np.array(image_zyx.shape) < fov):
        # A read box thinner than the field of view (a sliver cell at the edge of the volume
        # with little overlap) cannot be segmented at all: its core stays unlabelled.
        return np.zeros(image_zyx.shape, np.uint32), {"skipped": 1}
    result = segment_subvolume(image_zyx, predictor, options)
    labels = result.labels
    if labels.size and int(labels.max()) >= 2**32:
        raise InputError(f"subvolume produced {int(labels.max())} objects; at most 2**32-1 fit the local ID bits")
    return labels.astype(np.uint32), dict(result.counters)


class SegmentTask(RegisteredTask):
    """One FFN pass over one subvolume; rerunning it rewrites the same staging file."""

    def __init__(self, staging: str, pass_name: str, index: list):
        super().__init__(staging, pass_name, [int(i) for i in index])

    def execute(self) -> None:
        path = labels_path(self.pass_name, self.index)
        if is_complete(self.staging, path):
            # Finished before the lease ran out (or the node died between write and delete).
            return
        run = load_run(self.staging)
        spec = run.pass_spec(self.pass_name)
        cell = run.grid.cell(self.index)
        started = time.perf_counter()
        image = read_box(open_layer(run.image_layer, layer_type="image"), cell.read)
        read_s = time.perf_counter() - started
        labels, counters = segment_image(image, spec)
        infer_s = time.perf_counter() - started - read_s
        if spec.consensus_with:
            previous, box = read_labels(self.staging, spec.consensus_with, self.index)
            if box != cell.read:
                raise LayerError(f"pass {spec.consensus_with} of cell {self.index} covers {box}, not {cell.read}")
            labels = split_consensus(previous, labels, spec.consensus_min_size)
        t0 = time.perf_counter()
        data = encode_labels(labels, cell.read)
        timing = {"read_s": read_s, "infer_s": infer_s, "encode_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        put_complete(self.staging, path, data, {"counters": counters, "timing": timing,
                                                "objects": int(len(np.unique(labels))) - int((labels == 0).any())})
        log.info("segment %s cell %s: read %.1fs, FFN %.1fs, write %.1fs", self.pass_name, self.index,
                 read_s, infer_s, time.perf_counter() - t0)


def prepare_run(
    image_layer: str,
    segmentation_layer: str,
    subvolume: Triple,
    overlap: Triple,
    bbox: Box | None = None,
    staging: str | None = None,
    match: MatchOptions = MatchOptions(),
    overwrite: bool = False,
) -> SegmentRun:
    """Validate the geometry, create the segmentation layer and the run's manifest."""
    image_layer, out = layer_url(image_layer), layer_url(segmentation_layer)
    image = open_layer(image_layer, layer_type="image")
    bounds = layer_bounds(image)
    box = bbox or bounds
    require_inside(box, bounds, "--bbox")
    chunk = tuple(int(c) for c in image.meta.chunk_size(0))
    # Relabel tasks write whole write boxes, so they must be chunk-aligned for two tasks never
    # to write one chunk: subvolume multiple of the chunk, box start on the chunk grid.
    for axis in range(3):
        if subvolume[axis] % chunk[axis]:
            raise InputError(f"--subvolume {subvolume}: not a multiple of the layer chunk size {chunk} in {'xyz'[axis]}")
        if (box.start[axis] - bounds.start[axis]) % chunk[axis]:
            raise InputError(f"--bbox {box}: start is not on the chunk grid {chunk} of {image_layer}")
        if overlap[axis] < 0 or overlap[axis] >= subvolume[axis]:
            raise InputError(f"--overlap {overlap}: expected 0 <= overlap < subvolume in every axis")
    # The segmentation layer covers the box segmented, not the whole image: every stage after it
    # (pyramid, meshes, skeletons, evaluation) then works on complete chunks only. Its voxel
    # offset places it in the image's frame; the box starts on the image's chunk grid, so both
    # layers share one grid.
    spec = LayerSpec(
        layer_type="segmentation",
        dtype="uint64",
        size=box.shape,
        resolution=tuple(float(r) for r in image.meta.resolution(0)),  # type: ignore[arg-type]
        voxel_offset=box.start,
        chunk_size=chunk,  # type: ignore[arg-type]
    )
    staging = layer_url(staging) if staging else default_staging(out)
    grid = SegmentGrid(box, tuple(subvolume), tuple(overlap))  # type: ignore[arg-type]
    provenance = Provenance("segment", {"grid": grid.to_dict(), "staging": staging, "match": dataclasses.asdict(match)},
                            [image_layer])
    create_layer(out, spec, provenance, overwrite=overwrite)
    run = SegmentRun(image_layer, out, staging, grid, match)
    try:
        existing = load_run(staging)
    except LayerError:
        existing = None
    if existing is not None and not overwrite:
        if existing.grid != grid or existing.image_layer != run.image_layer:
            raise LayerError(f"staging {staging} holds a run with another grid or image; pass --overwrite or another --staging")
        return existing
    if existing is not None:
        # A new run: finished files of the old one would otherwise be skipped as done work.
        for folder in ("labels", "faces", "equivalence"):
            store(staging).delete_prefix(folder)
        store(staging).delete(MANIFEST)
    save_run(run)
    return run


def add_pass(staging: str, spec: PassSpec) -> SegmentRun:
    """Record a pass in the run's manifest (replacing one of the same name)."""
    run = load_run(staging)
    if spec.consensus_with:
        run.pass_spec(spec.consensus_with)
    old = [p for p in run.passes if p.name == spec.name]
    if old and old[0] != spec:
        # Same name, other settings: its finished files would be skipped as done work.
        for folder in ("labels", "faces", "equivalence"):
            store(run.staging).delete_prefix(f"{folder}/{spec.name}/")
    passes = tuple(p for p in run.passes if p.name != spec.name) + (spec,)
    run = replace(run, passes=passes)
    save_run(run)
    return run


def create_segment_tasks(run: SegmentRun, pass_name: str) -> list[SegmentTask]:
    run.pass_spec(pass_name)
    return [SegmentTask(run.staging, pass_name, list(cell.index)) for cell in run.grid.cells()]
