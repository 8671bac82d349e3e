"""Stitching subvolume segmentations into one: global IDs, overlap matching, equivalence,
relabelling and oversegmentation consensus, as pure functions of numpy arrays.

The shape is igneous's connected-components pipeline (faces -> equivalence -> relabel), with
the face step matching *objects of two independent segmentations* in their shared overlap
instead of touching voxels of one: two FFN runs label the same neurite with different IDs, and
only agreement in the overlap says that they are the same object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exaconnect.errors import InputError

# uint64 global ID = task number in the high 32 bits, the subvolume's own object ID in the low
# 32 bits: unique across the volume with no coordination between workers, and a task's IDs form
# one contiguous range (which the relabel step uses to read only its slice of the mapping).
LOCAL_BITS = 32
LOCAL_MASK = np.uint64((1 << LOCAL_BITS) - 1)
MAX_TASKS = (1 << (64 - LOCAL_BITS)) - 1


def pack_ids(local: np.ndarray, task_number: int) -> np.ndarray:
    """Local labels (0 = background) of task `task_number` -> global uint64 IDs (0 stays 0)."""
    if not 0 <= int(task_number) < MAX_TASKS:
        raise InputError(f"task_number={task_number}: expected 0 <= task_number < {MAX_TASKS}")
    local = np.asarray(local)
    if local.size and int(local.max()) > int(LOCAL_MASK):
        raise InputError(f"local label {int(local.max())} does not fit in {LOCAL_BITS} bits")
    out = local.astype(np.uint64)
    high = np.uint64(int(task_number) + 1) << np.uint64(LOCAL_BITS)
    # +1 so that task 0's objects are distinguishable from plain local IDs.
    out[out != 0] |= high
    return out


def task_id_range(task_number: int) -> tuple[int, int]:
    """[first, last] global IDs that task `task_number` can produce."""
    high = (int(task_number) + 1) << LOCAL_BITS
    return high + 1, high + int(LOCAL_MASK)


def unpack_task(global_ids: np.ndarray) -> np.ndarray:
    """The task number of each global ID (-1 for background)."""
    ids = np.asarray(global_ids, dtype=np.uint64)
    return (ids >> np.uint64(LOCAL_BITS)).astype(np.int64) - 1


# ---------------------------------------------------------------- overlap matching

@dataclass(frozen=True)
class MatchOptions:
    """When two objects of neighbouring subvolumes are the same object.

    A pair is joined only if each is the other's best partner in the overlap (most shared
    voxels), and their shared voxels are at least `min_overlap_voxels` and more than
    `min_fraction` of the smaller object's voxels in the overlap region. Mutual best partners
    make the matching one-to-one, so a face never joins two objects of one subvolume: where the
    two runs disagree (one merged what the other split), only the best-supported piece is joined
    and the rest stays split, never a new merge (the FFN's own preference). The fraction of the
    *smaller* object tolerates one run reaching further into the overlap than the other.
    """

    min_overlap_voxels: int = 100
    min_fraction: float = 0.5

    def __post_init__(self) -> None:
        if int(self.min_overlap_voxels) < 1:
            raise InputError(f"min_overlap_voxels={self.min_overlap_voxels}: expected >= 1")
        if not 0.0 < float(self.min_fraction) < 1.0:
            raise InputError(f"min_fraction={self.min_fraction}: expected 0 < min_fraction < 1")


@dataclass(frozen=True)
class OverlapTable:
    """Shared voxel counts of (a, b) object pairs in an overlap region, with each object's
    voxel count in that region (including voxels the other side left unlabelled)."""

    a_ids: np.ndarray
    b_ids: np.ndarray
    counts: np.ndarray
    a_sizes: np.ndarray  # per pair: voxels of a_id in the region
    b_sizes: np.ndarray  # per pair: voxels of b_id in the region


def overlap_table(a: np.ndarray, b: np.ndarray) -> OverlapTable:
    """Contingency of two label arrays over the same voxels; label 0 is background."""
    if a.shape != b.shape:
        raise InputError(f"overlap arrays differ in shape: {a.shape} vs {b.shape}; expected the same region")
    a = np.asarray(a, dtype=np.uint64).ravel()
    b = np.asarray(b, dtype=np.uint64).ravel()
    a_ids, a_counts = np.unique(a[a != 0], return_counts=True)
    b_ids, b_counts = np.unique(b[b != 0], return_counts=True)
    both = (a != 0) & (b != 0)
    if both.any():
        pairs, counts = np.unique(np.stack([a[both], b[both]], axis=1), axis=0, return_counts=True)
    else:
        pairs, counts = np.zeros((0, 2), np.uint64), np.zeros(0, np.int64)
    return OverlapTable(
        a_ids=pairs[:, 0].astype(np.uint64),
        b_ids=pairs[:, 1].astype(np.uint64),
        counts=counts.astype(np.int64),
        a_sizes=a_counts[np.searchsorted(a_ids, pairs[:, 0])].astype(np.int64),
        b_sizes=b_counts[np.searchsorted(b_ids, pairs[:, 1])].astype(np.int64),
    )


def match_objects(table: OverlapTable, options: MatchOptions = MatchOptions()) -> np.ndarray:
    """Matched pairs [n, 2] uint64 (a_id, b_id) under `options`; see MatchOptions."""
    if len(table.counts) == 0:
        return np.zeros((0, 2), np.uint64)
    # Best partner of every a and every b: sort by count descending (ties: smaller IDs first,
    # for a deterministic result), keep each ID's first row.
    order = np.lexsort((table.b_ids, table.a_ids, -table.counts))
    best_of_a = order[np.unique(table.a_ids[order], return_index=True)[1]]
    best_of_b = order[np.unique(table.b_ids[order], return_index=True)[1]]
    mutual = np.intersect1d(best_of_a, best_of_b)
    counts = table.counts[mutual]
    smaller = np.minimum(table.a_sizes[mutual], table.b_sizes[mutual])
    keep = mutual[(counts >= options.min_overlap_voxels) & (counts > options.min_fraction * smaller)]
    keep.sort()
    return np.stack([table.a_ids[keep], table.b_ids[keep]], axis=1).astype(np.uint64).reshape(-1, 2)


# ---------------------------------------------------------------- equivalence

@dataclass(frozen=True)
class Equivalence:
    """A sorted map from global IDs to their component's representative (the smallest member).
    IDs absent from `ids` map to themselves."""

    ids: np.ndarray  # uint64, sorted, unique
    roots: np.ndarray  # uint64, same length

    def apply(self, labels: np.ndarray) -> np.ndarray:
        return apply_equivalence(labels, self.ids, self.roots)


def equivalence_from_edges(edges: np.ndarray) -> Equivalence:
    """Union-find over an edge list [n, 2] of global IDs, via sparse connected components.

    scipy's connected_components on a CSR matrix is linear in edges and holds about 40 bytes
    per edge, which is what lets one node take the edges of 55,000 subvolumes.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.asarray(edges, dtype=np.uint64).reshape(-1, 2)
    if len(edges) == 0:
        empty = np.zeros(0, np.uint64)
        return Equivalence(empty, empty)
    ids, dense = np.unique(edges, return_inverse=True)
    dense = dense.reshape(-1, 2).astype(np.int32 if len(ids) < 2**31 else np.int64)
    graph = coo_matrix((np.ones(len(dense), np.bool_), (dense[:, 0], dense[:, 1])), shape=(len(ids), len(ids)))
    _, component = connected_components(graph.tocsr(), directed=False)
    del graph, dense
    # ids is sorted ascending, so the first member seen per component is its smallest ID.
    _, first = np.unique(component, return_index=True)
    return Equivalence(ids=ids, roots=ids[first[component]])


def apply_equivalence(labels: np.ndarray, ids: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """Each label replaced by its root; labels not in `ids` (and 0) are kept."""
    labels = np.asarray(labels, dtype=np.uint64)
    if len(ids) == 0 or labels.size == 0:
        return labels.copy()
    uniq, inverse = np.unique(labels, return_inverse=True)
    pos = np.searchsorted(ids, uniq)
    pos_clipped = np.minimum(pos, len(ids) - 1)
    found = ids[pos_clipped] == uniq
    mapped = np.where(found, roots[pos_clipped], uniq)
    return mapped[inverse].reshape(labels.shape)


def slice_equivalence(ids: np.ndarray, roots: np.ndarray, task_number: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of a sorted mapping that covers one task's ID range (cheap on a memory map)."""
    first, last = task_id_range(task_number)
    lo = int(np.searchsorted(ids, np.uint64(first), side="left"))
    hi = int(np.searchsorted(ids, np.uint64(last), side="right"))
    return np.asarray(ids[lo:hi]), np.asarray(roots[lo:hi])


# ---------------------------------------------------------------- consensus of two passes

def split_consensus(a: np.ndarray, b: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Oversegmentation consensus of two segmentations of the same voxels (google/ffn
    `split_segmentation_by_intersection`): every (a, b) pair of overlapping labels becomes its
    own object, so an object survives only where both runs agree and a merge made by one run
    is cut by the other. (a, 0) pieces are kept (the second run may simply not have reached
    there), (0, b) voxels stay 0; pieces smaller than `min_size` voxels become 0.

    Returns uint32 labels numbered 1..N (dense), ready for `pack_ids`.
    """
    if a.shape != b.shape:
        raise InputError(f"consensus inputs differ in shape: {a.shape} vs {b.shape}")
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    out = np.zeros(a.shape, dtype=np.uint32)
    inside = a != 0
    if not inside.any():
        return out
    pairs, inverse, counts = np.unique(
        np.stack([a[inside], b[inside]], axis=1), axis=0, return_inverse=True, return_counts=True
    )
    inverse = inverse.ravel()
    big = counts >= max(int(min_size), 1)
    new = np.zeros(len(pairs), dtype=np.uint32)
    new[big] = np.arange(1, int(big.sum()) + 1, dtype=np.uint32)
    out[inside] = new[inverse]
    return out


# ---------------------------------------------------------------- evaluation at faces

def objects_split_at_planes(
    segmentation: np.ndarray,
    groundtruth: np.ndarray,
    planes: dict[int, list[int]],
    min_crossing: int = 50,
) -> dict[str, int]:
    """How many ground-truth objects that cross a plane are split there by the segmentation.

    `planes` maps an axis (0=z, 1=y, 2=x) to the indices i where voxels i-1 and i are on two
    sides of a subvolume face. An object crosses a plane if at least `min_crossing` adjacent
    voxel pairs across it belong to it and are labelled on both sides; it is split there if its
    most common segment on the two sides differs. Returns crossing and split counts.
    """
    crossing = split = 0
    for axis, indices in planes.items():
        for i in indices:
            lo = np.take(segmentation, i - 1, axis=axis).ravel()
            hi = np.take(segmentation, i, axis=axis).ravel()
            g_lo = np.take(groundtruth, i - 1, axis=axis).ravel()
            g_hi = np.take(groundtruth, i, axis=axis).ravel()
            ok = (g_lo == g_hi) & (g_lo != 0) & (lo != 0) & (hi != 0)
            for g in np.unique(g_lo[ok]):
                sel = ok & (g_lo == g)
                if sel.sum() < min_crossing:
                    continue
                crossing += 1
                left_ids, left_counts = np.unique(lo[sel], return_counts=True)
                right_ids, right_counts = np.unique(hi[sel], return_counts=True)
                if left_ids[np.argmax(left_counts)] != right_ids[np.argmax(right_counts)]:
                    split += 1
    return {"crossing": crossing, "split": split}
