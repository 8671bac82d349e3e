"""Stitching kernels: ID packing, overlap matching that prefers splits, union-find,
consensus, and exact recovery of a synthetic volume cut into independently labelled
overlapping subvolumes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exaconnect.errors import InputError
from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.evaluate import segmentation_metrics
from exaconnect.precomputed.stitching import (
    MatchOptions,
    equivalence_from_edges,
    match_objects,
    objects_split_at_planes,
    overlap_table,
    pack_ids,
    slice_equivalence,
    split_consensus,
    task_id_range,
    unpack_task,
)
from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_labels
from exaconnect.services.segment_staging import SegmentGrid


def test_pack_ids_are_unique_across_tasks_and_keep_background():
    local = np.array([0, 1, 2, 7], np.uint32)
    a, b = pack_ids(local, 0), pack_ids(local, 1)
    assert a[0] == 0 and b[0] == 0
    assert not set(a[1:].tolist()) & set(b[1:].tolist())
    assert unpack_task(b).tolist() == [-1, 1, 1, 1]
    first, last = task_id_range(1)
    assert first <= int(b[1:].min()) and int(b.max()) <= last
    with pytest.raises(InputError, match="task_number"):
        pack_ids(local, -1)


def test_match_prefers_split_to_merge():
    # Side a has one object where side b has two (a false merge in a, or a split in b): only
    # the better-supported piece is joined, never both.
    a = np.ones((4, 10, 10), np.uint64)
    b = np.ones((4, 10, 10), np.uint64)
    b[:, :, 6:] = 2
    options = MatchOptions(min_overlap_voxels=1)
    assert match_objects(overlap_table(a, b), options).tolist() == [[1, 1]]
    assert match_objects(overlap_table(b, a), options).tolist() == [[1, 1]]
    # Two objects on each side, crossed: every object has at most one partner.
    a[:, 5:, :] = 2
    pairs = match_objects(overlap_table(a, b), options)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def test_match_tolerates_one_side_reaching_further():
    # b's object lies inside a's, which extends further into the overlap: same object.
    a = np.zeros((4, 10, 10), np.uint64)
    b = np.zeros((4, 10, 10), np.uint64)
    a[:, :, :8] = 4
    b[:, :, :3] = 3
    assert match_objects(overlap_table(a, b), MatchOptions(min_overlap_voxels=1)).tolist() == [[4, 3]]


def test_match_thresholds_and_validation():
    a = np.zeros((2, 10, 10), np.uint64)
    b = np.zeros((2, 10, 10), np.uint64)
    a[:, :5] = 3
    b[:, :5] = 4
    assert match_objects(overlap_table(a, b), MatchOptions(min_overlap_voxels=100)).tolist() == [[3, 4]]
    assert len(match_objects(overlap_table(a, b), MatchOptions(min_overlap_voxels=101))) == 0
    b[:, 2:5] = 0  # 40 of a's 100 voxels shared: below half of the smaller object (b) is fine,
    assert len(match_objects(overlap_table(a, b), MatchOptions(min_overlap_voxels=1, min_fraction=0.5))) == 1
    b[:, :5] = 0
    b[:, :2, :4] = 4  # 16 shared, b has 16 but a's best partner; fraction of smaller = 1
    assert len(match_objects(overlap_table(a, b), MatchOptions(min_overlap_voxels=20))) == 0
    with pytest.raises(InputError, match="min_fraction"):
        MatchOptions(min_fraction=1.0)


def _union_find(edges: list[tuple[int, int]]) -> dict[int, int]:
    parent: dict[int, int] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), max_size=60))
def test_equivalence_matches_a_plain_union_find(edges):
    big = [(a + (5 << 32), b + (9 << 32)) for a, b in edges]
    equivalence = equivalence_from_edges(np.array(big, np.uint64).reshape(-1, 2))
    expected = _union_find(big)
    assert dict(zip(equivalence.ids.tolist(), equivalence.roots.tolist())) == expected
    labels = np.array([0, 3, *expected], np.uint64)
    mapped = equivalence.apply(labels)
    assert mapped[0] == 0 and mapped[1] == 3
    assert mapped[2:].tolist() == [expected[x] for x in expected]


def test_slice_equivalence_returns_one_tasks_range():
    ids = np.sort(np.concatenate([pack_ids(np.array([1, 5]), t) for t in range(4)]))
    roots = ids.copy()
    part, _ = slice_equivalence(ids, roots, 2)
    assert unpack_task(part).tolist() == [2, 2]


def test_split_consensus_cuts_merges_of_either_pass():
    a = np.array([[1, 1, 1, 1, 0, 0]], np.uint64)
    b = np.array([[5, 5, 6, 6, 6, 0]], np.uint64)
    out = split_consensus(a, b)
    assert out[0, 0] == out[0, 1] != out[0, 2] == out[0, 3]
    assert out[0, 4] == 0 and out[0, 5] == 0  # (0, b) stays unlabelled
    a2 = np.array([[1, 1, 2, 2, 2]], np.uint64)
    b2 = np.array([[7, 7, 7, 0, 0]], np.uint64)
    out2 = split_consensus(a2, b2, min_size=2)
    assert out2.tolist() == [[1, 1, 0, 2, 2]]  # the (2, 7) piece of one voxel is dropped, (2, 0) kept


def _cut(labels: np.ndarray, grid: SegmentGrid, seed: int = 0) -> dict:
    """Each cell's read box with its own, random local numbering, as independent runs give."""
    rng = np.random.default_rng(seed)
    out = {}
    for cell in grid.cells():
        (x0, y0, z0), (x1, y1, z1) = cell.read.start, cell.read.stop
        part = labels[z0:z1, y0:y1, x0:x1]
        ids = np.unique(part[part != 0])
        lut = np.zeros(int(labels.max()) + 1, np.uint32)
        lut[ids] = rng.permutation(len(ids)).astype(np.uint32) + 1
        out[cell.index] = (lut[part], cell.read)
    return out


def stitch_in_memory(pieces: dict, grid: SegmentGrid, options: MatchOptions) -> np.ndarray:
    """The three stitch stages as plain calls (the queue version is in test_segment_service)."""
    from exaconnect.services.stitch import _crop

    edges = [np.zeros((0, 2), np.uint64)]
    for cell in grid.cells():
        labels, read = pieces[cell.index]
        for other in grid.forward_neighbors(cell.index):
            other_labels, other_read = pieces[other]
            region = read.intersection(other_read)
            a = pack_ids(_crop(labels, read, region), grid.task_number(cell.index))
            b = pack_ids(_crop(other_labels, other_read, region), grid.task_number(other))
            edges.append(match_objects(overlap_table(a, b), options))
    equivalence = equivalence_from_edges(np.concatenate(edges))
    x1, y1, z1 = grid.bounds.stop
    out = np.zeros((z1, y1, x1), np.uint64)
    for cell in grid.cells():
        labels, read = pieces[cell.index]
        core = equivalence.apply(pack_ids(_crop(labels, read, cell.write), grid.task_number(cell.index)))
        (a, b, c), (d, e, f) = cell.write.start, cell.write.stop
        out[c:f, b:e, a:d] = core
    return out


def test_grid_cells_agree_with_chunk_grid():
    grid = SegmentGrid(Box((0, 0, 0), (70, 64, 40)), (32, 32, 32), (8, 8, 8))
    cells = grid.cells()
    assert {grid.task_number(c.index) for c in cells} == set(range(3 * 2 * 2)) and len(cells) == 12
    for cell in cells:
        assert grid.cell(cell.index) == cell


@pytest.mark.parametrize("overlap", [4, 8])
def test_stitching_recovers_a_volume_cut_into_independent_subvolumes(overlap):
    labels = synthetic_labels(SyntheticSpec(shape=(48, 64, 56), neurites=20, seed=3))
    grid = SegmentGrid(Box((0, 0, 0), (56, 64, 48)), (24, 32, 16), (overlap,) * 3)
    stitched = stitch_in_memory(_cut(labels, grid), grid, MatchOptions(min_overlap_voxels=1))
    metrics = segmentation_metrics(stitched, labels)
    assert metrics["vi_merge"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["vi_split"] == pytest.approx(0.0, abs=1e-9)
    planes = {0: [16, 32], 1: [32], 2: [24, 48]}
    faces = objects_split_at_planes(stitched, labels, planes, min_crossing=1)
    assert faces["crossing"] > 10 and faces["split"] == 0


def test_a_merge_in_one_subvolume_does_not_spread():
    labels = synthetic_labels(SyntheticSpec(shape=(32, 32, 64), neurites=12, seed=5))
    grid = SegmentGrid(Box((0, 0, 0), (64, 32, 32)), (32, 32, 32), (8, 8, 8))
    pieces = _cut(labels, grid)
    # Merge the two largest objects of cell (0,0,0) only, as a bad FFN run would.
    local, read = pieces[(0, 0, 0)]
    ids, counts = np.unique(local[local != 0], return_counts=True)
    big = ids[np.argsort(counts)[-2:]]
    merged = local.copy()
    merged[merged == big[1]] = big[0]
    pieces[(0, 0, 0)] = (merged, read)
    stitched = stitch_in_memory(pieces, grid, MatchOptions(min_overlap_voxels=1))
    right = stitched[:, :, 32:]
    truth_right = labels[:, :, 32:]
    # Outside the bad subvolume no two true objects share a label.
    assert segmentation_metrics(right, truth_right)["vi_merge"] == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.tuples(*[st.integers(1, 40)] * 3), st.tuples(*[st.integers(4, 16)] * 3),
       st.tuples(*[st.integers(0, 6)] * 3), st.tuples(*[st.integers(-5, 5)] * 3))
def test_grid_write_boxes_tile_the_bounds_and_task_numbers_are_dense(size, subvolume, overlap, offset):
    bounds = Box.from_shape(size, offset)
    grid = SegmentGrid(bounds, subvolume, overlap)
    cells = grid.cells()
    assert sum(c.write.size for c in cells) == bounds.size
    assert sorted(grid.task_number(c.index) for c in cells) == list(range(len(cells)))
    for cell in cells:
        assert cell.read.contains(cell.write) and bounds.contains(cell.read)
        for other in grid.forward_neighbors(cell.index):
            assert not grid.cell(other).write.intersection(cell.write).size
