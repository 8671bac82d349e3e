"""P3 of refinement: agglomeration by FFN resegmentation at decision points.

For two neighbouring objects A and B, a small box is cut around a point of their contact (the
decision point). The FFN is run twice in it, once from a seed deep inside A and once from a
seed deep inside B, with both objects cleared from the canvas and every other object kept as
context (the field of view never moves into them). If A and B are one neurite, the network
fills both from either side: the two masks agree (high intersection over union) and each run
covers most of the other object. If they are two neurites, each run stays in its own object.
Both runs together are the evidence for one pair; a pair is merged only when every criterion
holds (google/ffn's resegmentation analysis measures the same quantities: IoU of the two
masks, the consistency of each run with A and with B, and the voxels the network deleted
while moving, a sign of a run that first leaked and then retracted; the code is ours).

The pieces are plain functions of arrays: `contact_pairs` finds the pairs and their points,
`resegment_pairs` runs the network and measures, `accept` applies the thresholds and
`equivalence_from_edges` (precomputed/stitching.py) turns the accepted pairs into one
equivalence. services/refine.py runs them as queue stages over a whole volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from scipy.special import logit

from exaconnect.errors import InputError

from .canvas import Canvas
from .config import InferenceOptions, ModelConfig
from .driver import drive

# A voxel counts as deleted by an update when it was confidently inside (p >= 0.8) and the new
# prediction puts it outside (p < 0.5): the reference's measure.
DELETED_FROM = np.float32(logit(0.8))

# Evidence columns, one row per pair (float64; NaN where a run could not be made).
EVIDENCE_FIELDS = (
    "iou",            # |A-run & B-run| / |A-run | B-run| in the analysis box
    "a_self",         # fraction of A covered by the run from A
    "a_cross",        # fraction of B covered by the run from A
    "b_self",         # fraction of B covered by the run from B
    "b_cross",        # fraction of A covered by the run from B
    "a_deleted",      # voxels deleted during the run from A / voxels of its mask
    "b_deleted",
    "a_voxels",       # voxels of A in the analysis box
    "b_voxels",
    "evaluations",    # network evaluations of both runs
)
COLUMN = {name: i for i, name in enumerate(EVIDENCE_FIELDS)}


def _triple(name: str, value, minimum: int) -> tuple[int, int, int]:
    try:
        items = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: expected three integers (x, y, z)") from None
    if len(items) != 3 or any(v < minimum for v in items):
        raise InputError(f"{name}={value!r}: expected three integers (x, y, z) >= {minimum}")
    return items  # type: ignore[return-value]


@dataclass(frozen=True)
class ResegmentOptions:
    """Geometry of one decision (triples are x, y, z voxels, the FFN config's convention).

    `radius`: half-size of the box the FFN runs in around the decision point (the box is
    2 * radius + 1 voxels, clipped to the volume; the field of view must fit); `analysis_radius`:
    half-size of the box, inside it, where the masks are compared (away from the box's edge,
    where the runs are cut off); `max_contact_distance`: objects closer than this along an
    axis (voxels) are neighbours (1: touching faces; FFN objects are often separated by a thin
    unclaimed membrane, which 2-3 bridges); `min_contact`: contacts a pair needs to be
    resegmented; `min_object_voxels`: voxels each object needs in the analysis box.
    """

    radius: tuple[int, int, int] = (24, 24, 24)
    analysis_radius: tuple[int, int, int] = (16, 16, 16)
    max_contact_distance: int = 2
    min_contact: int = 10
    min_object_voxels: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", _triple("p3.radius", self.radius, 1))
        object.__setattr__(self, "analysis_radius", _triple("p3.analysis_radius", self.analysis_radius, 1))
        if any(a > r for a, r in zip(self.analysis_radius, self.radius)):
            raise InputError(f"p3.analysis_radius={self.analysis_radius}: expected <= p3.radius={self.radius}")
        for name in ("max_contact_distance", "min_contact", "min_object_voxels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"p3.{name}={value!r}: expected an integer >= 1")

    @property
    def radius_zyx(self) -> np.ndarray:
        return np.array(self.radius[::-1])

    @property
    def analysis_radius_zyx(self) -> np.ndarray:
        return np.array(self.analysis_radius[::-1])


@dataclass(frozen=True)
class MergeThresholds:
    """When the evidence of a pair joins it: every criterion must hold."""

    min_iou: float = 0.6
    min_cross: float = 0.5       # each run covers at least this fraction of the other object
    min_self: float = 0.5        # each run covers at least this fraction of its own object
    max_deleted: float = 0.05    # voxels deleted during a run, per voxel of its mask
    # At least one run covers this fraction of the other object. The FFN's coverage is often
    # one-sided: a run from a large object floods a small piece of itself, while the small
    # piece's run stops short; with a lower `min_cross` this admits such pairs.
    min_cross_one: float = 0.0

    def __post_init__(self) -> None:
        for name in ("min_iou", "min_cross", "min_self", "max_deleted", "min_cross_one"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise InputError(f"p3.{name}={getattr(self, name)!r}: expected a fraction in [0, 1]")
            object.__setattr__(self, name, value)


# ---------------------------------------------------------------- decision points

@dataclass
class Contacts:
    """Neighbouring object pairs (a < b), their contact counts and one decision point each (z, y, x)."""

    pairs: np.ndarray   # uint64 [n, 2]
    counts: np.ndarray  # int64 [n]
    points: np.ndarray  # int64 [n, 3]

    def __len__(self) -> int:
        return len(self.counts)


def contact_pairs(labels: np.ndarray, max_distance: int = 1, owned: Sequence[int] | None = None) -> Contacts:
    """Pairs of different objects with voxels at most `max_distance` apart along an axis.

    Each contact is a voxel pair (p, p + d * axis), 1 <= d <= max_distance, both labelled and
    labelled differently; it is counted where p lies in the first `owned` voxels of each axis
    (all of `labels` when None), so that boxes cut with a margin of `max_distance` on their
    upper sides count every contact of a volume exactly once. A pair's decision point is its
    contact (midpoint, rounded down) nearest to the mean of its contacts: on the interface, in
    its middle.
    """
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels {labels.shape} {labels.dtype}: expected a 3-d integer array")
    if not isinstance(max_distance, int) or max_distance < 1:
        raise InputError(f"max_distance={max_distance!r}: expected an integer >= 1")
    owned = tuple(labels.shape) if owned is None else tuple(int(o) for o in owned)
    labels = np.asarray(labels, dtype=np.uint64)
    firsts, seconds, where = [], [], []
    for axis in range(3):
        for d in range(1, max_distance + 1):
            if labels.shape[axis] <= d:
                continue
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis] = slice(0, labels.shape[axis] - d)
            hi[axis] = slice(d, None)
            a, b = labels[tuple(lo)], labels[tuple(hi)]
            hit = (a != 0) & (b != 0) & (a != b)
            if not hit.any():
                continue
            idx = np.nonzero(hit)
            position = np.stack(idx, axis=1).astype(np.int64)
            keep = np.all(position < np.array(owned), axis=1)
            if not keep.any():
                continue
            position = position[keep]
            first, second = a[idx][keep], b[idx][keep]
            position[:, axis] += d // 2
            firsts.append(np.minimum(first, second))
            seconds.append(np.maximum(first, second))
            where.append(position)
    if not firsts:
        return Contacts(np.zeros((0, 2), np.uint64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64))
    pair_rows = np.stack([np.concatenate(firsts), np.concatenate(seconds)], axis=1)
    position = np.concatenate(where)
    pairs, inverse, counts = np.unique(pair_rows, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    mean = np.stack([np.bincount(inverse, position[:, k], len(pairs)) for k in range(3)], axis=1) / counts[:, None]
    distance = ((position - mean[inverse]) ** 2).sum(axis=1)
    # Per pair, the contact nearest its mean (ties: the first in C order of position).
    order = np.lexsort((position[:, 2], position[:, 1], position[:, 0], distance, inverse))
    first_of_pair = order[np.unique(inverse[order], return_index=True)[1]]
    return Contacts(pairs.astype(np.uint64), counts.astype(np.int64), position[first_of_pair])


def merge_contacts(parts: Sequence[Contacts]) -> Contacts:
    """Contacts of several boxes of one volume (points in one frame) as one table: counts add
    up, and a pair's point is the one from the box where it had the most contacts."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Contacts(np.zeros((0, 2), np.uint64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64))
    pairs = np.concatenate([p.pairs for p in parts])
    counts = np.concatenate([p.counts for p in parts])
    points = np.concatenate([p.points for p in parts])
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    total = np.bincount(inverse, counts, len(unique)).astype(np.int64)
    order = np.lexsort((-counts, inverse))
    best = order[np.unique(inverse[order], return_index=True)[1]]
    return Contacts(unique.astype(np.uint64), total, points[best])


# ---------------------------------------------------------------- resegmentation

@dataclass
class DecisionBox:
    """One pair's data: image and labels of the box around its decision point (z, y, x arrays),
    the point's position in the box, and the pair's IDs."""

    image: np.ndarray
    labels: np.ndarray
    point: tuple[int, int, int]
    id_a: int
    id_b: int


def decision_box(shape: Sequence[int], point: Sequence[int], options: ResegmentOptions) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) (z, y, x) of the box around `point`, clipped to an array of `shape`."""
    point = np.asarray(point, np.int64)
    start = np.maximum(point - options.radius_zyx, 0)
    stop = np.minimum(point + options.radius_zyx + 1, np.asarray(shape))
    return start, stop


def _seed_in(mask: np.ndarray, margin: np.ndarray) -> tuple[int, int, int] | None:
    """The voxel of `mask` farthest from its border among those whose FOV fits in the box."""
    inner = np.zeros(mask.shape, bool)
    inner[tuple(slice(int(m), int(s - m)) for m, s in zip(margin, mask.shape))] = True
    candidates = mask & inner
    if not candidates.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    depth[~candidates] = -1
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(depth)), depth.shape))  # type: ignore[return-value]


@dataclass
class _Run:
    canvas: Canvas
    analysis: tuple[slice, ...]
    deleted: int = 0
    before: np.ndarray | None = field(default=None, repr=False)


def resegment_pairs(
    boxes: Sequence[DecisionBox],
    network: Callable[[np.ndarray, np.ndarray], np.ndarray],
    model: ModelConfig,
    inference: InferenceOptions,
    options: ResegmentOptions = ResegmentOptions(),
    batch_size: int = 8,
) -> np.ndarray:
    """Evidence [len(boxes), len(EVIDENCE_FIELDS)] for each pair (see EVIDENCE_FIELDS); a row is
    NaN where no decision could be made (the box is thinner than the field of view, or an
    object has too few voxels in the analysis box or no voxel whose FOV fits)."""
    evidence = np.full((len(boxes), len(EVIDENCE_FIELDS)), np.nan)
    fov = np.array(model.fov_zyx)
    margin = fov // 2
    runs: list[_Run] = []
    steps = []
    owners: list[tuple[int, np.ndarray, np.ndarray]] = []
    for row, box in enumerate(boxes):
        if box.image.shape != box.labels.shape or box.image.ndim != 3:
            raise InputError(f"pair {box.id_a}-{box.id_b}: image {box.image.shape} and labels {box.labels.shape} "
                             "differ; expected one 3-d box")
        if np.any(np.array(box.labels.shape) < fov):
            continue
        point = np.asarray(box.point)
        lo = np.maximum(point - options.analysis_radius_zyx, 0)
        hi = np.minimum(point + options.analysis_radius_zyx + 1, box.labels.shape)
        analysis = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        seg_a = box.labels == box.id_a
        seg_b = box.labels == box.id_b
        voxels_a, voxels_b = int(seg_a[analysis].sum()), int(seg_b[analysis].sum())
        if min(voxels_a, voxels_b) < options.min_object_voxels:
            continue
        seeds = (_seed_in(seg_a, margin), _seed_in(seg_b, margin))
        if seeds[0] is None or seeds[1] is None:
            continue
        context = (box.labels != 0) & ~seg_a & ~seg_b
        for seed in seeds:
            canvas = Canvas(box.image, model, inference)
            # Other objects stay as context: the field of view never centres on them.
            canvas.segmentation[context] = 1
            runs.append(_Run(canvas, analysis))
            steps.append(canvas.segment_at(seed))
        owners.append((row, seg_a[analysis], seg_b[analysis]))

    def before(index: int) -> None:
        run = runs[index]
        run.before = run.canvas.seed[run.analysis].copy()

    def after(index: int) -> None:
        run = runs[index]
        now = run.canvas.seed[run.analysis]
        with np.errstate(invalid="ignore"):
            run.deleted += int(np.sum((run.before >= DELETED_FROM) & (now < 0)))
        run.before = None

    result = drive(steps, network, batch_size=batch_size, before_update=before, after_update=after)
    for k, (row, seg_a, seg_b) in enumerate(owners):
        run_a, run_b = runs[2 * k], runs[2 * k + 1]
        with np.errstate(invalid="ignore"):
            mask_a = run_a.canvas.seed[run_a.analysis] >= run_a.canvas.segment_threshold
            mask_b = run_b.canvas.seed[run_b.analysis] >= run_b.canvas.segment_threshold
        evidence[row] = pair_evidence(mask_a, mask_b, seg_a, seg_b, run_a.deleted, run_b.deleted,
                                      result.evaluations[2 * k] + result.evaluations[2 * k + 1])
    return evidence


def pair_evidence(mask_a: np.ndarray, mask_b: np.ndarray, seg_a: np.ndarray, seg_b: np.ndarray,
                  deleted_a: int, deleted_b: int, evaluations: int) -> np.ndarray:
    """One evidence row from the two runs' masks and the two objects, all over the analysis box."""
    union = int((mask_a | mask_b).sum())
    size_a, size_b = max(int(seg_a.sum()), 1), max(int(seg_b.sum()), 1)
    row = {
        "iou": int((mask_a & mask_b).sum()) / union if union else 0.0,
        "a_self": int((mask_a & seg_a).sum()) / size_a,
        "a_cross": int((mask_a & seg_b).sum()) / size_b,
        "b_self": int((mask_b & seg_b).sum()) / size_b,
        "b_cross": int((mask_b & seg_a).sum()) / size_a,
        "a_deleted": deleted_a / max(int(mask_a.sum()), 1),
        "b_deleted": deleted_b / max(int(mask_b.sum()), 1),
        "a_voxels": float(seg_a.sum()),
        "b_voxels": float(seg_b.sum()),
        "evaluations": float(evaluations),
    }
    return np.array([row[name] for name in EVIDENCE_FIELDS], np.float64)


def accept(evidence: np.ndarray, thresholds: MergeThresholds = MergeThresholds()) -> np.ndarray:
    """Which pairs merge (bool [n]): every criterion holds; a NaN row never merges."""
    e = np.asarray(evidence, np.float64).reshape(-1, len(EVIDENCE_FIELDS))
    c = COLUMN
    with np.errstate(invalid="ignore"):
        ok = (e[:, c["iou"]] >= thresholds.min_iou)
        ok &= np.minimum(e[:, c["a_cross"]], e[:, c["b_cross"]]) >= thresholds.min_cross
        ok &= np.maximum(e[:, c["a_cross"]], e[:, c["b_cross"]]) >= thresholds.min_cross_one
        ok &= np.minimum(e[:, c["a_self"]], e[:, c["b_self"]]) >= thresholds.min_self
        ok &= np.maximum(e[:, c["a_deleted"]], e[:, c["b_deleted"]]) <= thresholds.max_deleted
    return ok & ~np.isnan(e).any(axis=1)


# ---------------------------------------------------------------- one array, end to end

@dataclass
class AgglomerationResult:
    labels: np.ndarray        # uint64, joined objects carry their component's smallest ID
    contacts: Contacts        # the pairs resegmented
    evidence: np.ndarray      # [n, len(EVIDENCE_FIELDS)]
    merged: np.ndarray        # bool [n]
    counters: dict


def decision_boxes(image: np.ndarray, labels: np.ndarray, contacts: Contacts,
                   options: ResegmentOptions) -> list[DecisionBox]:
    boxes = []
    for (a, b), point in zip(contacts.pairs, contacts.points):
        start, stop = decision_box(labels.shape, point, options)
        sel = tuple(slice(int(s), int(e)) for s, e in zip(start, stop))
        boxes.append(DecisionBox(image[sel], labels[sel], tuple(int(v) for v in np.asarray(point) - start), int(a), int(b)))
    return boxes


def candidate_contacts(labels: np.ndarray, options: ResegmentOptions) -> Contacts:
    """The pairs of `labels` worth a decision: at least `min_contact` contacts."""
    contacts = contact_pairs(labels, options.max_contact_distance)
    keep = contacts.counts >= options.min_contact
    return Contacts(contacts.pairs[keep], contacts.counts[keep], contacts.points[keep])


def agglomerate_array(
    image: np.ndarray,
    labels: np.ndarray,
    network: Callable[[np.ndarray, np.ndarray], np.ndarray],
    model: ModelConfig,
    inference: InferenceOptions,
    options: ResegmentOptions = ResegmentOptions(),
    thresholds: MergeThresholds = MergeThresholds(),
    batch_size: int = 8,
) -> AgglomerationResult:
    """P3 over one array held in memory (the stages do the same over a volume, in tasks)."""
    from exaconnect.precomputed.stitching import apply_equivalence, equivalence_from_edges

    if image.shape != labels.shape:
        raise InputError(f"P3: image {image.shape} and labels {labels.shape}: expected one shape")
    contacts = candidate_contacts(labels, options)
    evidence = resegment_pairs(decision_boxes(image, labels, contacts, options), network, model, inference, options,
                               batch_size=batch_size)
    merged = accept(evidence, thresholds)
    equivalence = equivalence_from_edges(contacts.pairs[merged])
    out = apply_equivalence(labels, equivalence.ids, equivalence.roots)
    evaluations = np.nan_to_num(evidence[:, COLUMN["evaluations"]])
    counters = {"p3-pairs": int(len(contacts)), "p3-decided": int((~np.isnan(evidence).any(axis=1)).sum()),
                "p3-merged-pairs": int(merged.sum()),
                "p3-objects-before": int(len(np.unique(labels[labels != 0]))),
                "p3-objects-after": int(len(np.unique(out[out != 0]))),
                "p3-voxels-changed": int((out != np.asarray(labels, np.uint64)).sum()),
                "network-evaluations": int(evaluations.sum())}
    return AgglomerationResult(out, contacts, evidence, merged, counters)
