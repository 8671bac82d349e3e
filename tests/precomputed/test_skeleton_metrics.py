"""Skeleton metrics (expected run length with funlib.evaluate's rules): a hand-computed case,
the lenient merge rule, boxes off the origin, kimimaro ground-truth skeletons, skeleton layers,
and the reference segmentation on a real crop checked against a plain per-edge loop."""

from __future__ import annotations

import numpy as np
import pytest

from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.skeleton_metrics import (
    KimimaroParameters,
    Skeleton,
    read_skeleton_layer,
    skeleton_metrics,
    skeletonize_labels,
)

# Anisotropic voxels and a box off the origin: every chain runs along x, so each edge is 10 nm.
RESOLUTION = (10.0, 6.0, 40.0)
OFFSET = (100, 200, 30)  # x, y, z voxel of segmentation[0, 0, 0]
SHAPE_ZYX = (3, 7, 9)


def chain(y: int, n: int, z: int = 1, x0: int = 0) -> Skeleton:
    """n nodes at local voxels (x0..x0+n-1, y, z) of the box, in nm."""
    local = np.array([[x0 + i, y, z] for i in range(n)], dtype=float)
    vertices = (local + np.array(OFFSET)) * np.array(RESOLUTION)
    return Skeleton(vertices, np.array([[i, i + 1] for i in range(n - 1)]))


def hand_case() -> tuple[dict[int, Skeleton], np.ndarray]:
    """Three skeletons and a segmentation with one merge, two splits and one omitted gap.

    A (y=1, 6 nodes, 50 nm): x0..2 in segment 1, x3..5 in segment 2.
    B (y=3, 5 nodes, 40 nm): x0..1 in segment 2, x2..4 in segment 3.
    C (y=5, 4 nodes, 30 nm): x0,1,3 in segment 4, x2 in label 0.

    Segment 2 holds nodes of A and B: a merging segment, so A's two edges and B's one edge in it
    are merged. Split edges: A x2-x3 (1|2) and B x1-x2 (2|3). Omitted: C x1-x2 and x2-x3.
    Correct: A 20 nm in segment 1, B 20 nm in segment 3, C 10 nm in segment 4.
    Run lengths: A 20^2/50 = 8, B 20^2/40 = 10, C 10^2/30 = 3.33;
    ERL = (50*8 + 40*10 + 30*3.33) / 120 = (400 + 400 + 100) / 120 = 7.5 nm.
    A perfect segmentation: (50^2 + 40^2 + 30^2) / 120 = 5000/120 = 41.67 nm.
    """
    seg = np.zeros(SHAPE_ZYX, dtype=np.uint32)
    seg[:, 1, 0:3], seg[:, 1, 3:6] = 1, 2
    seg[:, 3, 0:2], seg[:, 3, 2:5] = 2, 3
    seg[:, 5, 0:2], seg[:, 5, 3] = 4, 4
    skeletons = {11: chain(1, 6), 12: chain(3, 5), 13: chain(5, 4)}
    return skeletons, seg


def test_hand_computed_case():
    skeletons, seg = hand_case()
    m = skeleton_metrics(skeletons, seg, RESOLUTION, OFFSET)
    assert m.erl == pytest.approx(7.5)
    assert m.erl_max == pytest.approx(5000 / 120)
    assert m.run_lengths == pytest.approx({11: 8.0, 12: 10.0, 13: 100 / 30})
    assert m.skeleton_length == pytest.approx(120.0) and m.skeleton_count == 3
    assert (m.edges, m.correct_edges, m.merged_edges, m.split_edges, m.omitted_edges) == (12, 5, 3, 2, 2)
    assert m.merging_segments == 1 and m.merged_skeletons == 2
    assert m.omitted_fraction == pytest.approx(2 / 12)
    assert m.omitted_length == pytest.approx(20.0) and m.merged_length == pytest.approx(30.0)
    assert m.edges_outside == 0
    d = m.to_dict()
    assert d["erl"] == pytest.approx(7.5) and d["skeleton_merging_segments"] == 1
    assert d["skeleton_split_edges"] == 2 and d["skeleton_omitted_fraction"] == pytest.approx(1 / 6)


def test_labels_near_the_top_of_uint64():
    """Chunked-graph ids use the high bits of uint64; pair keys must not overflow."""
    skeletons, seg = hand_case()
    wide = np.where(seg > 0, np.uint64(2**63) + seg.astype(np.uint64) * np.uint64(2**40), 0).astype(np.uint64)
    m = skeleton_metrics(skeletons, wide, RESOLUTION, OFFSET)
    assert m.erl == pytest.approx(7.5) and m.merging_segments == 1 and m.split_edges == 2


def test_perfect_and_empty_segmentations():
    skeletons, seg = hand_case()
    truth = np.zeros_like(seg)
    truth[:, 1, :6], truth[:, 3, :5], truth[:, 5, :4] = 1, 2, 3
    perfect = skeleton_metrics(skeletons, truth, RESOLUTION, OFFSET)
    assert perfect.erl == pytest.approx(perfect.erl_max) and perfect.correct_edges == 12
    empty = skeleton_metrics(skeletons, np.zeros_like(seg), RESOLUTION, OFFSET)
    assert empty.erl == 0 and empty.omitted_fraction == 1 and empty.merging_segments == 0
    # One segment over everything merges all three skeletons.
    merged = skeleton_metrics(skeletons, np.ones_like(seg), RESOLUTION, OFFSET)
    assert merged.erl == 0 and merged.merged_edges == 12 and merged.merging_segments == 1


def test_lenient_merge_rule():
    skeletons, seg = hand_case()
    # K=2: B still has two nodes in segment 2, so nothing changes.
    assert skeleton_metrics(skeletons, seg, RESOLUTION, OFFSET, merge_min_nodes=2).erl == pytest.approx(7.5)
    # K=3: B's two nodes no longer make segment 2 a merger. A: (20^2 + 20^2)/50 = 16;
    # B's edge inside segment 2 is now correct: (10^2 + 20^2)/40 = 12.5; C unchanged 3.33.
    # ERL = (800 + 500 + 100)/120 = 11.67 nm.
    m = skeleton_metrics(skeletons, seg, RESOLUTION, OFFSET, merge_min_nodes=3)
    assert m.erl == pytest.approx(1400 / 120)
    assert m.run_lengths == pytest.approx({11: 16.0, 12: 12.5, 13: 100 / 30})
    assert m.merging_segments == 0 and m.merged_edges == 0 and m.merge_min_nodes == 3
    with pytest.raises(InputError, match="merge_min_nodes"):
        skeleton_metrics(skeletons, seg, RESOLUTION, OFFSET, merge_min_nodes=0)


def test_offset_matters_and_voxel_vertices_agree():
    skeletons, seg = hand_case()
    # Read at the wrong offset, every node falls outside the box: nothing is scored.
    lost = skeleton_metrics(skeletons, seg, RESOLUTION, (0, 0, 0))
    assert lost.edges == 0 and lost.edges_outside == 12 and lost.erl == 0
    # The same skeletons in global voxel coordinates, and at voxel centres, score the same.
    as_voxels = {k: Skeleton(s.vertices / np.array(RESOLUTION), s.edges) for k, s in skeletons.items()}
    assert skeleton_metrics(as_voxels, seg, RESOLUTION, OFFSET, vertex_unit="voxel").erl == pytest.approx(7.5)
    centred = {k: Skeleton(s.vertices + 0.5 * np.array(RESOLUTION), s.edges) for k, s in skeletons.items()}
    assert skeleton_metrics(centred, seg, RESOLUTION, OFFSET).erl == pytest.approx(7.5)
    # float32 storage (precomputed skeleton files) leaves vertices a hair below the voxel corner
    nudged = {k: Skeleton(s.vertices - 1e-4, s.edges) for k, s in skeletons.items()}
    assert skeleton_metrics(nudged, seg, RESOLUTION, OFFSET).erl == pytest.approx(7.5)


def test_box_cut_through_a_skeleton_scores_the_pieces_inside():
    skeletons, seg = hand_case()
    # Drop the first three x columns of the box: A keeps x3..5, B keeps x3..4, C keeps x3 alone.
    # B's nodes in segment 2 are gone, so segment 2 no longer merges.
    cropped = seg[:, :, 3:]
    offset = (OFFSET[0] + 3, OFFSET[1], OFFSET[2])
    m = skeleton_metrics(skeletons, cropped, RESOLUTION, offset)
    # A: x3-x4, x4-x5 in segment 2 (20 nm, no merge now); B: x3-x4 in segment 3 (10 nm).
    assert m.edges == 3 and m.edges_outside == 9
    assert m.merging_segments == 0 and m.correct_edges == 3
    assert m.erl == pytest.approx((20**2 + 10**2) / 30)


def test_bad_input_is_named():
    skeletons, seg = hand_case()
    with pytest.raises(InputError, match="skeleton 5"):
        skeleton_metrics({5: Skeleton(np.zeros((2, 3)), np.array([[0, 2]]))}, seg)
    with pytest.raises(InputError, match="integer labels"):
        skeleton_metrics(skeletons, seg.astype(float), RESOLUTION, OFFSET)
    with pytest.raises(InputError, match="resolution"):
        skeleton_metrics(skeletons, seg, (10, 0, 40), OFFSET)


def tubes(shape_zyx=(20, 24, 28)) -> np.ndarray:
    """Two long bodies and a speck, for kimimaro."""
    labels = np.zeros(shape_zyx, dtype=np.uint32)
    labels[2:18, 3:9, 3:25] = 7
    labels[2:18, 13:20, 2:26] = 9
    labels[0:2, 0:2, 0:2] = 3  # 8 voxels, under the dust threshold
    return labels


def test_kimimaro_skeletons_lie_in_their_bodies_off_the_origin():
    labels = tubes()
    offset = (40, 17, 9)
    parameters = KimimaroParameters(scale=1.5, const=30, dust_threshold=20, anisotropy=(8.0, 8.0, 30.0))
    skeletons = skeletonize_labels(labels, parameters, offset=offset)
    assert set(skeletons) == {7, 9}
    for label, skeleton in skeletons.items():
        voxel = np.rint(skeleton.vertices / np.array(parameters.anisotropy)).astype(int) - np.array(offset)
        assert (labels[voxel[:, 2], voxel[:, 1], voxel[:, 0]] == label).all()
        assert len(skeleton.edges) > 0
    truth = skeleton_metrics(skeletons, labels, parameters.anisotropy, offset)
    assert truth.erl == pytest.approx(truth.erl_max) and truth.erl_max > 100
    joined = skeleton_metrics(skeletons, (labels > 0).astype(np.uint8), parameters.anisotropy, offset)
    assert joined.merging_segments == 1 and joined.erl == 0
    assert parameters.to_dict()["anisotropy"] == [8.0, 8.0, 30.0]


def write_skeleton_layer(path, labels_zyx, skeletons, resolution, offset, sharded: bool = False):
    """A segmentation layer holding `labels_zyx` at `offset` with a skeleton source (one shard file
    when `sharded`, else one file per body)."""
    from cloudvolume import CloudVolume
    from cloudvolume import Skeleton as CVSkeleton

    info = CloudVolume.create_new_info(num_channels=1, layer_type="segmentation", data_type="uint32",
                                       encoding="raw", resolution=list(resolution), voxel_offset=list(offset),
                                       volume_size=list(labels_zyx.shape[::-1]), chunk_size=[16, 16, 16])
    info["skeletons"] = "skeletons"
    vol = CloudVolume(f"file://{path}", info=info, progress=False)
    vol.commit_info()
    if sharded:
        vol.skeleton.meta.info["sharding"] = {
            "@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0, "hash": "identity", "minishard_bits": 0,
            "shard_bits": 0, "minishard_index_encoding": "gzip", "data_encoding": "gzip"}
    vol.skeleton.meta.commit_info()
    vol = CloudVolume(f"file://{path}", progress=False)
    vol[:, :, :] = labels_zyx.transpose(2, 1, 0)[..., None]
    vol.skeleton.upload([CVSkeleton(s.vertices, s.edges, segid=k) for k, s in skeletons.items()])
    return vol


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_skeleton_layer_round_trip(tmp_path, sharded):
    skeletons, seg = hand_case()
    truth = np.zeros_like(seg)
    truth[:, 1, :6], truth[:, 3, :5], truth[:, 5, :4] = 11, 12, 13
    vol = write_skeleton_layer(tmp_path / "gt", truth, skeletons, RESOLUTION, OFFSET, sharded)
    assert vol.skeleton.meta.is_sharded() == sharded
    read = read_skeleton_layer(str(tmp_path / "gt"))
    assert set(read) == {11, 12, 13}
    assert skeleton_metrics(read, seg, RESOLUTION, OFFSET).erl == pytest.approx(7.5)
    assert set(read_skeleton_layer(str(tmp_path / "gt"), ids=[12])) == {12}
    # A layer without skeletons is refused by name.
    from cloudvolume import CloudVolume

    info = CloudVolume.create_new_info(1, "segmentation", "uint32", "raw", [10, 10, 10], [0, 0, 0], [8, 8, 8])
    CloudVolume(f"file://{tmp_path / 'bare'}", info=info).commit_info()
    with pytest.raises(LayerError, match="no skeletons"):
        read_skeleton_layer(str(tmp_path / "bare"))


def funlib_loop(skeletons, segmentation, resolution, offset):
    """funlib.evaluate's evaluation rules as a plain loop over nodes and edges (an independent
    oracle for the vectorised kernel)."""
    label_of = {}
    touching: dict[int, set] = {}
    for sid, s in skeletons.items():
        for i, vertex in enumerate(s.vertices):
            x, y, z = (int(round(c / r)) - o for c, r, o in zip(vertex, resolution, offset))
            label = int(segmentation[z, y, x])
            label_of[sid, i] = label
            touching.setdefault(label, set()).add(sid)
    merging = {label for label, sids in touching.items() if label != 0 and len(sids) > 1}
    total, squared, counts = 0.0, 0.0, {"omitted": 0, "split": 0, "merged": 0}
    for sid, s in skeletons.items():
        correct: dict[int, float] = {}
        for a, b in s.edges:
            length = float(np.linalg.norm(s.vertices[a] - s.vertices[b]))
            total += length
            la, lb = label_of[sid, a], label_of[sid, b]
            if la == 0 or lb == 0:
                counts["omitted"] += 1
            elif la != lb:
                counts["split"] += 1
            elif la in merging:
                counts["merged"] += 1
            else:
                correct[la] = correct.get(la, 0.0) + length
        squared += sum(c * c for c in correct.values())
    return squared / total, len(merging), counts


def test_reference_segmentation_on_a_real_crop(shared_dir, fib25_groundtruth):
    """The issue's 96^3 crop (64,64,64)-(160,160,160) of training_sample2, reference segmentation,
    kimimaro skeletons of the ground truth (scale 1.5, const 300, dust 100, 10 nm)."""
    box = slice(64, 160)
    groundtruth = np.ascontiguousarray(fib25_groundtruth[box, box, box])
    reference = np.load(shared_dir / "reference/fib25/training_sample2_ffn_segmentation.npz")["segmentation"]
    reference = np.ascontiguousarray(reference[box, box, box])
    skeletons = skeletonize_labels(groundtruth, KimimaroParameters(), offset=(64, 64, 64))
    m = skeleton_metrics(skeletons, reference, (10, 10, 10), (64, 64, 64))
    erl, merging, counts = funlib_loop(skeletons, reference, (10, 10, 10), (64, 64, 64))
    assert m.erl == pytest.approx(erl) and m.merging_segments == merging
    assert (m.omitted_edges, m.split_edges, m.merged_edges) == (counts["omitted"], counts["split"], counts["merged"])
    assert m.edges_outside == 0 and m.skeleton_count == len(skeletons)
    # Merges cost most of the run length here, as on the whole cube.
    assert 50 < m.erl < 0.2 * m.erl_max
    assert m.merging_segments > 0
