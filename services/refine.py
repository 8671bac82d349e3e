"""Refinement of a stitched segmentation, after the first FFN pass (P1, services/segment*.py):

    P2  refine.p2-grow         one task per subvolume: new FFN objects seeded in unclaimed voxels
                               (ffn/reseed.py), claimed voxels frozen
        refine.p2-faces        new objects matched across the faces of neighbouring subvolumes
        refine.p2-equivalence  one task: their global equivalence, and the P2 report
        refine.p2-relabel      the input layer plus the new objects, into a new layer
    P3  refine.p3-pairs        one task per subvolume: neighbouring object pairs and a decision
                               point each, with object sizes
        refine.p3-resegment    tasks of `pairs_per_task` pairs: FFN resegmentation evidence
                               (ffn/agglomerate.py)
        refine.p3-equivalence  one task: accepted pairs -> one equivalence, and the P3 report
        refine.p3-relabel      the input layer through the equivalence, into a new layer
    fill refine.fill           one task per subvolume (read with its overlap): the voxels still
                               unclaimed handed to the objects around them (ffn/fill.py), no
                               network, no new object
        refine.fill-report     one task: the fill's report

Every step reads only files that carry a completion marker and skips work already done, so a
stage can be rerun or resumed. The merge thresholds are parameters of the P3 equivalence step
only: changing them reruns that step and the relabel, never the FFN. Each pass writes what it
did (objects added or merged, voxels changed, network evaluations) as `refine.json` into its
output layer's folder. The pipeline file's `refine:` section (order 55, between segment and
meshes) plans P2 and/or P3 on the segmentation and publishes the refined layer in its place.
Tasks run on the segment service's queue: they need the same workers (the FFN, TensorFlow).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from taskqueue import RegisteredTask

from exaconnect.errors import InputError, LayerError
from exaconnect.ffn.agglomerate import (
    COLUMN,
    EVIDENCE_FIELDS,
    Contacts,
    DecisionBox,
    MergeThresholds,
    ResegmentOptions,
    accept,
    contact_pairs,
    merge_contacts,
    resegment_pairs,
)
from exaconnect.ffn.reseed import ReseedOptions
from exaconnect.precomputed.bbox import Box, GridCell, Triple, chunk_grid
from exaconnect.precomputed.layers import (
    LayerSpec,
    Provenance,
    create_layer,
    layer_bounds,
    layer_url,
    open_layer,
    read_box,
    write_box,
)
from exaconnect.precomputed.stitching import (
    MatchOptions,
    apply_equivalence,
    equivalence_from_edges,
    match_objects,
    overlap_table,
    pack_ids,
)
from exaconnect.precomputed.store import ArtifactStore
from exaconnect.services.stages import ChainedStep, PipelineSection, Stage, register_section

log = logging.getLogger("exaconnect.refine")

REPORT = "refine.json"
P2_STEPS = ("grow", "faces", "equivalence", "relabel")
P3_STEPS = ("pairs", "resegment", "equivalence", "relabel")
FILL_STEPS = ("fill", "fill-report")


# ---------------------------------------------------------------- plans (what a pass's tasks read)

@dataclass(frozen=True)
class RefineGrid:
    """Subvolumes of a refinement pass (x, y, z voxels): multiples of the layer's chunk size."""

    subvolume: Triple = (256, 256, 256)
    overlap: Triple = (32, 32, 32)

    def cells(self, bounds: Box, chunk: Triple, overlap: bool = True) -> list[GridCell]:
        return list(chunk_grid(bounds, self.subvolume, self.overlap if overlap else (0, 0, 0), align_to=chunk))


@dataclass(frozen=True)
class ReseedPlan:
    """P2 over `input_layer` (a segmentation of `image_layer`) into `output_layer`."""

    image_layer: str
    input_layer: str
    output_layer: str
    model: str
    inference: dict = dataclasses.field(default_factory=dict)
    options: ReseedOptions = ReseedOptions()
    grid: RefineGrid = RefineGrid()
    match: MatchOptions = MatchOptions()
    staging: str = ""

    def __post_init__(self) -> None:
        _normalise_layers(self)


@dataclass(frozen=True)
class AgglomeratePlan:
    """P3 over `input_layer` into `output_layer`."""

    image_layer: str
    input_layer: str
    output_layer: str
    model: str
    inference: dict = dataclasses.field(default_factory=dict)
    options: ResegmentOptions = ResegmentOptions()
    thresholds: MergeThresholds = MergeThresholds()
    grid: RefineGrid = RefineGrid(overlap=(0, 0, 0))
    pairs_per_task: int = 32
    staging: str = ""

    def __post_init__(self) -> None:
        _normalise_layers(self)
        if not isinstance(self.pairs_per_task, int) or self.pairs_per_task < 1:
            raise InputError(f"p3.pairs_per_task={self.pairs_per_task!r}: expected an integer >= 1")


@dataclass(frozen=True)
class FillPlan:
    """The fill over `input_layer` into `output_layer`: `sigma` smooths the image (voxels);
    `open_radius` then opens every object by that many voxels (ffn/fill.py `open_objects`; 0:
    not at all). The grid's overlap is the margin each subvolume is filled with, so a gap at a
    subvolume face is decided from both sides; it must be at least 2 * open_radius."""

    image_layer: str
    input_layer: str
    output_layer: str
    sigma: float = 0.0
    grid: RefineGrid = RefineGrid()
    staging: str = ""
    open_radius: int = 0

    def __post_init__(self) -> None:
        _normalise_layers(self)
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not self.sigma >= 0:
            raise InputError(f"fill.sigma={self.sigma!r}: expected a number >= 0 (voxels)")
        if isinstance(self.open_radius, bool) or not isinstance(self.open_radius, int) or self.open_radius < 0:
            raise InputError(f"fill.open_radius={self.open_radius!r}: expected an integer >= 0 (voxels)")
        if min(self.grid.overlap) < 2 * self.open_radius:
            raise InputError(f"fill.open_radius={self.open_radius}: the refine overlap {self.grid.overlap} must be "
                             f"at least {2 * self.open_radius} voxels (twice the radius) on every axis")


def _normalise_layers(plan: Any) -> None:
    for name in ("image_layer", "input_layer", "output_layer"):
        object.__setattr__(plan, name, layer_url(getattr(plan, name)))
    if plan.input_layer == plan.output_layer:
        raise InputError(f"refine: output layer {plan.output_layer} is the input layer; expected a new layer")
    object.__setattr__(plan, "staging", layer_url(plan.staging) if plan.staging else plan.output_layer + ".staging")
    if getattr(plan, "model", "") and os.path.exists(plan.model):
        # Workers may start elsewhere (a pod, a PBS job): a local model path is stored absolute.
        object.__setattr__(plan, "model", os.path.abspath(plan.model))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _plan_from(kind: str, data: dict) -> ReseedPlan | AgglomeratePlan | FillPlan:
    data = dict(data)
    data["grid"] = RefineGrid(tuple(data["grid"]["subvolume"]), tuple(data["grid"]["overlap"]))
    if kind == "fill":
        return FillPlan(**data)
    if kind == "p2":
        data["options"] = ReseedOptions(**data["options"])
        data["match"] = MatchOptions(**data["match"])
        return ReseedPlan(**data)
    data["options"] = ResegmentOptions(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data["options"].items()})
    data["thresholds"] = MergeThresholds(**data["thresholds"])
    return AgglomeratePlan(**data)


def load_plan(staging: str, kind: str) -> Any:
    data = ArtifactStore(staging).get_json(f"{kind}.json")
    if data is None:
        raise LayerError(f"{staging}/{kind}.json not found; expected the staging folder of a refine pass")
    return _plan_from(kind, data)


def _prepare(plan: Any, kind: str) -> None:
    """Check the geometry, create the output layer (the input's geometry) and save the plan."""
    image = open_layer(plan.image_layer, layer_type="image")
    source = open_layer(plan.input_layer, layer_type="segmentation")
    bounds = layer_bounds(source)
    if not layer_bounds(image).contains(bounds):
        raise InputError(f"refine: segmentation {plan.input_layer} covers {bounds}, outside the image "
                         f"{plan.image_layer} ({layer_bounds(image)})")
    chunk = tuple(int(c) for c in source.meta.chunk_size(0))
    for axis in range(3):
        if plan.grid.subvolume[axis] % chunk[axis]:
            raise InputError(f"refine subvolume {plan.grid.subvolume}: not a multiple of the chunk size {chunk} of "
                             f"{plan.input_layer} in {'xyz'[axis]}")
        if not 0 <= plan.grid.overlap[axis] < plan.grid.subvolume[axis]:
            raise InputError(f"refine overlap {plan.grid.overlap}: expected 0 <= overlap < subvolume")
    spec = LayerSpec("segmentation", "uint64", bounds.shape, tuple(float(r) for r in source.meta.resolution(0)),
                     bounds.start, chunk)
    create_layer(plan.output_layer, spec, Provenance(f"refine.{kind}", _plain(plan), [plan.image_layer, plan.input_layer]),
                 overwrite=True)
    files = ArtifactStore(plan.staging)
    old = files.get_json(f"{kind}.json")
    if old is not None and _work(old) != _work(_plain(plan)):
        # Another plan in the same staging: its finished files would be taken as done work.
        files.delete_prefix(f"{kind}/")
    files.put_json(f"{kind}.json", _plain(plan))


def _work(plan: dict) -> dict:
    """What a pass's FFN work depends on: all of its plan but P3's merge thresholds."""
    return {k: v for k, v in plan.items() if k != "thresholds"}


def _cells(plan: Any, overlap: bool = True) -> list[GridCell]:
    source = open_layer(plan.input_layer, layer_type="segmentation")
    chunk = tuple(int(c) for c in source.meta.chunk_size(0))
    return plan.grid.cells(layer_bounds(source), chunk, overlap)  # type: ignore[arg-type]


def _task_numbers(cells: list[GridCell]) -> dict[tuple, int]:
    return {tuple(c.index): n for n, c in enumerate(sorted(cells, key=lambda c: tuple(reversed(c.index))))}


def _name(index) -> str:
    return "_".join(str(int(i)) for i in index)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _load(files: ArtifactStore, key: str) -> np.ndarray:
    return np.load(io.BytesIO(files.require(key)), allow_pickle=False)


def _crop(labels: np.ndarray, read: Box, region: Box) -> np.ndarray:
    lo = [r - b for r, b in zip(region.start, read.start)]
    hi = [r - b for r, b in zip(region.stop, read.start)]
    return labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]


@functools.lru_cache(maxsize=2)
def _network(model: str, inference_json: str):
    """One loaded network per worker process and model (loading costs seconds, tasks minutes)."""
    from exaconnect.ffn.predictor import load_model

    return load_model(model, config_overrides=json.loads(inference_json) or None, device="auto")


def _predictor(plan: Any):
    predictor = _network(plan.model, json.dumps(plan.inference, sort_keys=True))
    return predictor.at_precision(predictor.config.inference.precision)


def _report(plan: Any, kind: str, figures: dict) -> None:
    """What the pass did, in the output layer's folder (beside its info) and in staging."""
    record = {"pass": kind, "input": plan.input_layer, "output": plan.output_layer, **figures}
    ArtifactStore(plan.staging).put_json(f"{kind}/{REPORT}", record)
    ArtifactStore(plan.output_layer).put_json(REPORT, record)


# ---------------------------------------------------------------- P2 tasks

class ReseedGrowTask(RegisteredTask):
    """New objects in one subvolume's unclaimed voxels (its read box), local IDs 1..n."""

    def __init__(self, staging: str, index: list):
        super().__init__(staging, [int(i) for i in index])

    def execute(self) -> None:
        from exaconnect.ffn.reseed import grow_unclaimed

        files = ArtifactStore(self.staging)
        key = f"p2/labels/{_name(self.index)}.npz"
        if files.is_complete(key):
            return
        plan: ReseedPlan = load_plan(self.staging, "p2")
        cell = next(c for c in _cells(plan) if list(c.index) == self.index)
        image = read_box(open_layer(plan.image_layer, layer_type="image"), cell.read)
        labels = read_box(open_layer(plan.input_layer, layer_type="segmentation"), cell.read)
        predictor = _predictor(plan)
        started, cpu = time.perf_counter(), time.process_time()
        if np.any(np.array(image.shape) < np.array(predictor.model_config.fov_zyx)):
            new, counters = np.zeros(labels.shape, np.uint32), {"skipped": 1, "network-evaluations": 0}
        else:
            result = grow_unclaimed(image, labels, predictor, predictor.model_config, predictor.config.inference,
                                    plan.options)
            new, counters = result.labels, result.counters
        core = _crop(new, cell.read, cell.write)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, labels=new, read_box=np.array(cell.read.to_list(), np.int64))
        files.put(key, buffer.getvalue(), {
            "counters": counters, "max_input_label": int(labels.max()) if labels.size else 0,
            "new_ids_in_core": np.unique(core[core > 0]).astype(int).tolist(),
            "voxels_claimed_in_core": int((core > 0).sum()),
            "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu})


def _new_labels(files: ArtifactStore, index) -> tuple[np.ndarray, Box]:
    with np.load(io.BytesIO(files.require(f"p2/labels/{_name(index)}.npz"))) as f:
        return f["labels"], Box.from_list(f["read_box"].tolist())


class ReseedFacesTask(RegisteredTask):
    """Match one subvolume's new objects with its +x, +y, +z neighbours' in their overlaps."""

    def __init__(self, staging: str, index: list):
        super().__init__(staging, [int(i) for i in index])

    def execute(self) -> None:
        files = ArtifactStore(self.staging)
        key = f"p2/faces/{_name(self.index)}.npy"
        if files.is_complete(key):
            return
        plan: ReseedPlan = load_plan(self.staging, "p2")
        numbers = _task_numbers(_cells(plan))
        own = tuple(self.index)
        labels, read = _new_labels(files, own)
        edges = [np.zeros((0, 2), np.uint64)]
        for axis in range(3):
            other = list(own)
            other[axis] += 1
            if tuple(other) not in numbers:
                continue
            other_labels, other_read = _new_labels(files, other)
            region = read.intersection(other_read)
            if region.empty():
                continue
            a = pack_ids(_crop(labels, read, region), numbers[own])
            b = pack_ids(_crop(other_labels, other_read, region), numbers[tuple(other)])
            edges.append(match_objects(overlap_table(a, b), plan.match))
        edges_all = np.concatenate(edges)
        files.put(key, _npy(edges_all), {"edges": int(len(edges_all))})


class ReseedEquivalenceTask(RegisteredTask):
    """Every face match -> one equivalence of the new objects; their IDs start above the input's."""

    def __init__(self, staging: str):
        super().__init__(staging)

    def execute(self) -> None:
        files = ArtifactStore(self.staging)
        if files.is_complete("p2/equivalence/roots.npy"):
            return
        plan: ReseedPlan = load_plan(self.staging, "p2")
        cells = _cells(plan)
        numbers = _task_numbers(cells)
        edges = np.concatenate([np.zeros((0, 2), np.uint64)] +
                               [_load(files, f"p2/faces/{_name(c.index)}.npy") for c in cells])
        markers = {tuple(c.index): files.marker(f"p2/labels/{_name(c.index)}.npz") for c in cells}
        missing = [k for k, m in markers.items() if m is None]
        if missing:
            raise LayerError(f"{plan.staging}: P2 subvolumes {missing[:5]} not finished; run refine.p2-grow first")
        equivalence = equivalence_from_edges(edges)
        base = max(int(m["max_input_label"]) for m in markers.values())
        present = np.unique(np.concatenate([np.zeros(0, np.uint64)] + [
            pack_ids(np.array(m["new_ids_in_core"], np.uint64), numbers[k]) for k, m in markers.items()]))
        objects = len(np.unique(apply_equivalence(present, equivalence.ids, equivalence.roots)))
        files.put("p2/equivalence/ids.npy", _npy(equivalence.ids))
        files.put("p2/equivalence/roots.npy", _npy(equivalence.roots), {"base": base, "edges": int(len(edges))})
        counters = [m.get("counters", {}) for m in markers.values()]
        _report(plan, "p2", {
            "objects_added": int(objects), "objects_merged": 0, "objects_split": 0,
            "voxels_changed": int(sum(m["voxels_claimed_in_core"] for m in markers.values())),
            "network_evaluations": int(sum(c.get("network-evaluations", 0) for c in counters)),
            "seeds": int(sum(c.get("p2-seeds", 0) for c in counters)),
            "cpu_seconds": round(sum(m.get("cpu_seconds", 0.0) for m in markers.values()), 2),
            "subvolumes": len(cells), "new_ids_above": base})


class ReseedRelabelTask(RegisteredTask):
    """One subvolume's write box: the input labels, and new objects (global IDs) where it had 0."""

    def __init__(self, staging: str, index: list):
        super().__init__(staging, [int(i) for i in index])

    def execute(self) -> None:
        files = ArtifactStore(self.staging)
        plan: ReseedPlan = load_plan(self.staging, "p2")
        cells = _cells(plan)
        numbers = _task_numbers(cells)
        cell = next(c for c in cells if list(c.index) == self.index)
        new, read = _new_labels(files, cell.index)
        ids, roots = _load(files, "p2/equivalence/ids.npy"), _load(files, "p2/equivalence/roots.npy")
        base = np.uint64(files.marker("p2/equivalence/roots.npy")["base"])
        core = apply_equivalence(pack_ids(_crop(new, read, cell.write), numbers[tuple(cell.index)]), ids, roots)
        labels = read_box(open_layer(plan.input_layer, layer_type="segmentation"), cell.write).astype(np.uint64)
        take = (core != 0) & (labels == 0)
        labels[take] = core[take] + base
        write_box(open_layer(plan.output_layer, layer_type="segmentation"), cell.write, labels)


# ---------------------------------------------------------------- P3 tasks

class PairsTask(RegisteredTask):
    """One subvolume's neighbouring pairs (contacts starting in its write box) and object sizes."""

    def __init__(self, staging: str, index: list):
        super().__init__(staging, [int(i) for i in index])

    def execute(self) -> None:
        files = ArtifactStore(self.staging)
        key = f"p3/pairs/{_name(self.index)}.npz"
        if files.is_complete(key):
            return
        plan: AgglomeratePlan = load_plan(self.staging, "p3")
        source = open_layer(plan.input_layer, layer_type="segmentation")
        bounds = layer_bounds(source)
        cell = next(c for c in _cells(plan, overlap=False) if list(c.index) == self.index)
        d = plan.options.max_contact_distance
        box = Box(cell.write.start, tuple(s + d for s in cell.write.stop)).intersection(bounds)  # type: ignore[arg-type]
        labels = read_box(source, box)
        contacts = contact_pairs(labels, d, owned=tuple(reversed(cell.write.shape)))
        core = _crop(labels, box, cell.write)
        ids, sizes = np.unique(core[core != 0], return_counts=True)
        start_zyx = np.array(box.start[::-1], np.int64)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, pairs=contacts.pairs, counts=contacts.counts, points=contacts.points + start_zyx,
                            ids=ids.astype(np.uint64), sizes=sizes.astype(np.int64))
        files.put(key, buffer.getvalue(), {"pairs": int(len(contacts))})


def _read_pairs(files: ArtifactStore, index) -> dict:
    with np.load(io.BytesIO(files.require(f"p3/pairs/{_name(index)}.npz"))) as f:
        return {k: f[k] for k in f.files}


def gather_candidates(plan: AgglomeratePlan) -> Contacts:
    """Every subvolume's contacts as one table of the pairs worth a decision (written once)."""
    files = ArtifactStore(plan.staging)
    if files.is_complete("p3/candidates.npz"):
        with np.load(io.BytesIO(files.require("p3/candidates.npz"))) as f:
            return Contacts(f["pairs"], f["counts"], f["points"])
    parts = [_read_pairs(files, c.index) for c in _cells(plan, overlap=False)]
    merged = merge_contacts([Contacts(p["pairs"], p["counts"], p["points"]) for p in parts])
    keep = merged.counts >= plan.options.min_contact
    candidates = Contacts(merged.pairs[keep], merged.counts[keep], merged.points[keep])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, pairs=candidates.pairs, counts=candidates.counts, points=candidates.points)
    files.put("p3/candidates.npz", buffer.getvalue(), {"pairs": int(len(candidates)), "touching": int(len(merged))})
    return candidates


class ResegmentTask(RegisteredTask):
    """FFN resegmentation evidence for candidate pairs [start, stop)."""

    def __init__(self, staging: str, start: int, stop: int):
        super().__init__(staging, int(start), int(stop))

    def execute(self) -> None:
        files = ArtifactStore(self.staging)
        key = f"p3/evidence/{self.start:012d}.npy"
        if files.is_complete(key):
            return
        plan: AgglomeratePlan = load_plan(self.staging, "p3")
        candidates = gather_candidates(plan)
        image_vol = open_layer(plan.image_layer, layer_type="image")
        label_vol = open_layer(plan.input_layer, layer_type="segmentation")
        bounds = layer_bounds(label_vol)
        predictor = _predictor(plan)
        boxes = []
        radius = np.array(plan.options.radius)
        for row in range(self.start, self.stop):
            point = candidates.points[row][::-1]  # x, y, z
            box = Box(tuple(int(v) for v in point - radius), tuple(int(v) for v in point + radius + 1)).intersection(bounds)
            a, b = (int(v) for v in candidates.pairs[row])
            boxes.append(DecisionBox(read_box(image_vol, box), read_box(label_vol, box),
                                     tuple(int(v) for v in (point - np.array(box.start))[::-1]), a, b))
        started, cpu = time.perf_counter(), time.process_time()
        evidence = resegment_pairs(boxes, predictor, predictor.model_config, predictor.config.inference, plan.options)
        files.put(key, _npy(evidence), {"pairs": self.stop - self.start, "seconds": time.perf_counter() - started,
                                        "cpu_seconds": time.process_time() - cpu})


def _batches(count: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, count)) for s in range(0, count, size)]


class AgglomerateEquivalenceTask(RegisteredTask):
    """Accepted pairs -> one equivalence (roots: the smallest ID of each group), and the report."""

    def __init__(self, staging: str):
        super().__init__(staging)

    def execute(self) -> None:
        files = ArtifactStore(self.staging)
        if files.is_complete("p3/equivalence/roots.npy"):
            return
        plan: AgglomeratePlan = load_plan(self.staging, "p3")
        candidates = gather_candidates(plan)
        batches = _batches(len(candidates), plan.pairs_per_task)
        rows = [np.zeros((0, len(EVIDENCE_FIELDS)))]
        cpu = 0.0
        for start, _ in batches:
            rows.append(_load(files, f"p3/evidence/{start:012d}.npy"))
            cpu += float(files.marker(f"p3/evidence/{start:012d}.npy").get("cpu_seconds", 0.0))
        evidence = np.concatenate(rows)
        merged = accept(evidence, plan.thresholds)
        equivalence = equivalence_from_edges(candidates.pairs[merged])
        sizes: dict[int, int] = {}
        for cell in _cells(plan, overlap=False):
            part = _read_pairs(files, cell.index)
            for i, s in zip(part["ids"].tolist(), part["sizes"].tolist()):
                sizes[i] = sizes.get(i, 0) + s
        renamed = equivalence.ids[equivalence.ids != equivalence.roots]
        files.put("p3/equivalence/ids.npy", _npy(equivalence.ids))
        files.put("p3/equivalence/roots.npy", _npy(equivalence.roots), {"merged_pairs": int(merged.sum())})
        decided = ~np.isnan(evidence).any(axis=1)
        _report(plan, "p3", {
            "pairs_touching": int(files.marker("p3/candidates.npz").get("touching", 0)),
            "pairs_resegmented": int(len(candidates)), "pairs_decided": int(decided.sum()),
            "pairs_merged": int(merged.sum()),
            "objects_merged": int(len(renamed)), "objects_added": 0, "objects_split": 0,
            "groups_formed": int(len(np.unique(equivalence.roots))),
            "voxels_changed": int(sum(sizes.get(int(i), 0) for i in renamed)),
            "network_evaluations": int(np.nansum(evidence[:, COLUMN["evaluations"]])),
            "cpu_seconds": round(cpu, 2), "thresholds": _plain(plan.thresholds)})


class AgglomerateRelabelTask(RegisteredTask):
    """One subvolume of the input layer through the P3 equivalence into the output layer."""

    def __init__(self, staging: str, index: list):
        super().__init__(staging, [int(i) for i in index])

    def execute(self) -> None:
        files = ArtifactStore(self.staging)
        plan: AgglomeratePlan = load_plan(self.staging, "p3")
        cell = next(c for c in _cells(plan, overlap=False) if list(c.index) == self.index)
        labels = read_box(open_layer(plan.input_layer, layer_type="segmentation"), cell.write)
        ids, roots = _load(files, "p3/equivalence/ids.npy"), _load(files, "p3/equivalence/roots.npy")
        write_box(open_layer(plan.output_layer, layer_type="segmentation"), cell.write,
                  apply_equivalence(labels, ids, roots))


# ---------------------------------------------------------------- the fill's tasks

class FillTask(RegisteredTask):
    """One subvolume: read with its overlap, filled, its write box written to the output layer."""

    def __init__(self, staging: str, index: list):
        super().__init__(staging, [int(i) for i in index])

    def execute(self) -> None:
        from exaconnect.ffn.fill import fill_unsegmented, open_objects

        files = ArtifactStore(self.staging)
        key = f"fill/done/{_name(self.index)}"
        if files.is_complete(key):
            return
        plan: FillPlan = load_plan(self.staging, "fill")
        cell = next(c for c in _cells(plan) if list(c.index) == self.index)
        cpu = time.process_time()
        image = read_box(open_layer(plan.image_layer, layer_type="image"), cell.read)
        labels = read_box(open_layer(plan.input_layer, layer_type="segmentation"), cell.read).astype(np.uint64)
        filled = open_objects(fill_unsegmented(image, labels, sigma=float(plan.sigma)), plan.open_radius)
        core, before = _crop(filled, cell.read, cell.write), _crop(labels, cell.read, cell.write)
        write_box(open_layer(plan.output_layer, layer_type="segmentation"), cell.write, core)
        files.put(key, b"", {"voxels": int(before.size), "voxels_unclaimed": int((before == 0).sum()),
                             "voxels_filled": int(((before == 0) & (core != 0)).sum()),
                             "voxels_opened": int(((before != 0) & (core == 0)).sum()),
                             "cpu_seconds": time.process_time() - cpu})


class FillReportTask(RegisteredTask):
    """One task: what the fill did, from every subvolume's marker, as the pass's report."""

    def __init__(self, staging: str):
        super().__init__(staging)

    def execute(self) -> None:
        files = ArtifactStore(self.staging)
        plan: FillPlan = load_plan(self.staging, "fill")
        cells = _cells(plan)
        markers = {tuple(c.index): files.marker(f"fill/done/{_name(c.index)}") for c in cells}
        missing = [k for k, m in markers.items() if m is None]
        if missing:
            raise LayerError(f"{plan.staging}: fill subvolumes {missing[:5]} not finished; run refine.fill first")
        total = {name: sum(m[name] for m in markers.values())
                 for name in ("voxels", "voxels_unclaimed", "voxels_filled", "voxels_opened")}
        unclaimed_after = total["voxels_unclaimed"] - total["voxels_filled"] + total["voxels_opened"]
        _report(plan, "fill", {
            "objects_added": 0, "objects_merged": 0, "objects_split": 0,
            "voxels_changed": total["voxels_filled"] + total["voxels_opened"],
            "voxels_filled": total["voxels_filled"], "voxels_opened": total["voxels_opened"],
            "unclaimed_fraction_before": round(total["voxels_unclaimed"] / max(total["voxels"], 1), 6),
            "unclaimed_fraction_after": round(unclaimed_after / max(total["voxels"], 1), 6),
            "network_evaluations": 0, "sigma": plan.sigma, "open_radius": plan.open_radius,
            "cpu_seconds": round(sum(m["cpu_seconds"] for m in markers.values()), 2), "subvolumes": len(cells)})


# ---------------------------------------------------------------- stages

@dataclass(frozen=True)
class ReseedStep(ChainedStep):
    """One step of P2 (see the module docstring)."""

    service: ClassVar[str] = "segment"
    stage_name: ClassVar[str] = "refine.p2-grow"
    lease_seconds: ClassVar[int] = 3600
    description: ClassVar[str] = "P2: FFN objects seeded in unclaimed voxels"
    steps: ClassVar[tuple[str, ...]] = P2_STEPS
    step_kind: ClassVar[str] = "P2"
    step_names: ClassVar[str] = "refine.p2-{step}"
    plan: ReseedPlan

    def make_tasks(self) -> list:
        staging = self.plan.staging
        if self.step == "grow":
            _prepare(self.plan, "p2")
        if self.step == "equivalence":
            return [ReseedEquivalenceTask(staging)]
        task = {"grow": ReseedGrowTask, "faces": ReseedFacesTask, "relabel": ReseedRelabelTask}[self.step]
        return [task(staging, list(c.index)) for c in _cells(self.plan)]

    def reads(self) -> tuple[str, ...]:
        return (self.plan.image_layer, self.plan.input_layer, self.plan.model)

    def writes(self) -> tuple[str, ...]:
        return (self.plan.output_layer,) if self.step == "relabel" else (f"{self.plan.staging}/p2/{self.step}",)


@dataclass(frozen=True)
class AgglomerateStep(ChainedStep):
    """One step of P3 (see the module docstring). The thresholds count only in the steps that
    use them, so a new choice of thresholds reruns the equivalence and relabel, not the FFN."""

    service: ClassVar[str] = "segment"
    stage_name: ClassVar[str] = "refine.p3-pairs"
    lease_seconds: ClassVar[int] = 3600
    description: ClassVar[str] = "P3: agglomeration by FFN resegmentation"
    steps: ClassVar[tuple[str, ...]] = P3_STEPS
    step_kind: ClassVar[str] = "P3"
    step_names: ClassVar[str] = "refine.p3-{step}"
    plan: AgglomeratePlan

    def parameters(self) -> dict[str, Any]:
        out = super().parameters()
        if self.step in ("pairs", "resegment"):
            out["plan"] = {k: v for k, v in out["plan"].items() if k != "thresholds"}
        return out

    def make_tasks(self) -> list:
        staging = self.plan.staging
        if self.step == "pairs":
            _prepare(self.plan, "p3")
            return [PairsTask(staging, list(c.index)) for c in _cells(self.plan, overlap=False)]
        if self.step == "resegment":
            candidates = gather_candidates(load_plan(staging, "p3"))
            return [ResegmentTask(staging, a, b) for a, b in _batches(len(candidates), self.plan.pairs_per_task)]
        if self.step == "equivalence":
            # The thresholds may differ from the plan the FFN steps saved: record the current ones.
            files = ArtifactStore(staging)
            saved = files.get_json("p3.json")
            current = _plain(self.plan)
            if saved != current:
                files.put_json("p3.json", current)
                files.delete("p3/equivalence/ids.npy")
                files.delete("p3/equivalence/roots.npy")
            return [AgglomerateEquivalenceTask(staging)]
        return [AgglomerateRelabelTask(staging, list(c.index)) for c in _cells(self.plan, overlap=False)]

    def reads(self) -> tuple[str, ...]:
        return (self.plan.image_layer, self.plan.input_layer, self.plan.model)

    def writes(self) -> tuple[str, ...]:
        return (self.plan.output_layer,) if self.step == "relabel" else (f"{self.plan.staging}/p3/{self.step}",)


@dataclass(frozen=True)
class FillStep(ChainedStep):
    """One step of the fill (see the module docstring)."""

    service: ClassVar[str] = "segment"
    stage_name: ClassVar[str] = "refine.fill"
    lease_seconds: ClassVar[int] = 1800
    description: ClassVar[str] = "fill: unclaimed voxels handed to the objects around them"
    steps: ClassVar[tuple[str, ...]] = FILL_STEPS
    step_kind: ClassVar[str] = "fill"
    step_names: ClassVar[str] = "refine.{step}"
    plan: FillPlan

    def make_tasks(self) -> list:
        if self.step == "fill-report":
            return [FillReportTask(self.plan.staging)]
        _prepare(self.plan, "fill")
        return [FillTask(self.plan.staging, list(c.index)) for c in _cells(self.plan)]

    def reads(self) -> tuple[str, ...]:
        return (self.plan.image_layer, self.plan.input_layer)

    def writes(self) -> tuple[str, ...]:
        return (self.plan.output_layer,) if self.step == "fill" else (f"{self.plan.staging}/fill/report",)


def fill_stages(plan: FillPlan, upstream: tuple[Stage, ...] = ()) -> list[Stage]:
    return FillStep.chain(upstream, plan=plan)


def reseed_stages(plan: ReseedPlan, upstream: tuple[Stage, ...] = ()) -> list[Stage]:
    return ReseedStep.chain(upstream, plan=plan)


def agglomerate_stages(plan: AgglomeratePlan, upstream: tuple[Stage, ...] = ()) -> list[Stage]:
    return AgglomerateStep.chain(upstream, plan=plan)


def read_report(layer: str) -> dict | None:
    """The `refine.json` a pass wrote beside its output layer (None if there is none)."""
    return ArtifactStore(layer).get_json(REPORT)


# ---------------------------------------------------------------- the pipeline section `refine:`

@dataclass(frozen=True)
class P2Section:
    enabled: bool = True
    min_seed_distance: float = 2.0
    peak_spacing: int = 3
    min_segment_size: int = 300
    membranes: bool = True
    max_seeds: int = 0


@dataclass(frozen=True)
class P3Section:
    enabled: bool = True
    radius: tuple[int, int, int] = (24, 24, 24)
    analysis_radius: tuple[int, int, int] = (16, 16, 16)
    max_contact_distance: int = 2
    min_contact: int = 10
    min_object_voxels: int = 100
    min_iou: float = 0.6
    min_cross: float = 0.5
    min_self: float = 0.5
    max_deleted: float = 0.05
    min_cross_one: float = 0.0
    pairs_per_task: int = 32


@dataclass(frozen=True)
class FillSection:
    enabled: bool = False
    sigma: float = 0.0
    open_radius: int = 0


@dataclass(frozen=True)
class RefineSection:
    """`refine:` in the pipeline file: P2, P3 and the fill after the segmentation, each optional
    (the section is off by default; the fill needs no model).
    `model` / `inference`: the network and its option overrides (default: the last FFN pass's)."""

    enabled: bool = False
    model: str = ""
    inference: dict = dataclasses.field(default_factory=dict)
    subvolume: tuple[int, int, int] = (256, 256, 256)
    overlap: tuple[int, int, int] = (32, 32, 32)
    downsample_mips: int = 2
    p2: P2Section = P2Section()
    p3: P3Section = P3Section()
    fill: FillSection = FillSection()


def _segment_model(context: Any) -> tuple[str, dict]:
    from exaconnect.services.segment_stages import SegmentPass

    passes = [s for s in context.stages if isinstance(s, SegmentPass)]
    if not passes:
        return "", {}
    return passes[-1].spec.model, dict(passes[-1].spec.inference)


def plan_refine(config: RefineSection, context: Any) -> None:
    """P2, P3 then the fill on the published segmentation; the last one's layer becomes the
    segmentation."""
    from exaconnect.services.downsample import DownsampleStage

    if "segmentation" not in context.layers:
        raise InputError("refine: no segmentation to refine; enable the segment section (or give an existing layer)")
    if "image" not in context.layers:
        raise InputError("refine: no image layer in the pipeline")
    model, inference = (config.model, dict(config.inference)) if config.model else _segment_model(context)
    if not model and (config.p2.enabled or config.p3.enabled):
        raise InputError("refine.model: no FFN model for P2 and P3; give one, or run the segment section before refine")
    if not (config.p2.enabled or config.p3.enabled or config.fill.enabled):
        return
    current, upstream = context.layers["segmentation"], context.requires("segmentation")
    context.layers.setdefault("segmentation_p1", current)
    last = None
    if config.p2.enabled:
        p = config.p2
        plan = ReseedPlan(context.layers["image"], current, context.layer("segmentation_p2"), model, inference,
                          ReseedOptions(p.min_seed_distance, p.peak_spacing, p.min_segment_size, p.membranes, p.max_seeds),
                          RefineGrid(config.subvolume, config.overlap))
        stages = reseed_stages(plan, upstream + context.requires("image"))
        context.add(*stages)
        current, upstream, last = plan.output_layer, (stages[-1],), stages[-1]
        context.layers["segmentation_p2"] = current
    if config.p3.enabled:
        p = config.p3
        plan3 = AgglomeratePlan(context.layers["image"], current, context.layer("segmentation_p3"), model, inference,
                                ResegmentOptions(p.radius, p.analysis_radius, p.max_contact_distance, p.min_contact,
                                                 p.min_object_voxels),
                                MergeThresholds(p.min_iou, p.min_cross, p.min_self, p.max_deleted, p.min_cross_one),
                                RefineGrid(config.subvolume, (0, 0, 0)), p.pairs_per_task)
        stages = agglomerate_stages(plan3, upstream + context.requires("image"))
        context.add(*stages)
        current, upstream, last = plan3.output_layer, (stages[-1],), stages[-1]
        context.layers["segmentation_p3"] = current
    if config.fill.enabled:
        plan_fill = FillPlan(context.layers["image"], current, context.layer("segmentation_filled"),
                             config.fill.sigma, RefineGrid(config.subvolume, config.overlap),
                             open_radius=config.fill.open_radius)
        stages = fill_stages(plan_fill, upstream + context.requires("image"))
        context.add(*stages)
        current, last = plan_fill.output_layer, stages[-1]
        context.layers["segmentation_filled"] = current
    if config.downsample_mips > 0:
        last = DownsampleStage(layer=current, num_mips=config.downsample_mips, upstream=(last,),
                               name="pyramid.refined")
        context.add(last)
    context.publish("segmentation", current, last)


register_section(PipelineSection("refine", RefineSection, plan_refine, order=55))
