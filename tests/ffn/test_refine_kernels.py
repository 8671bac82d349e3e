"""Refinement kernels (ffn/reseed.py, ffn/agglomerate.py) on constructed volumes with an oracle
network whose answer is known: it calls 'inside' every voxel of the field of view whose
intensity equals the intensity at its centre. So P2 must fill exactly the unclaimed part of
each region, and P3 must join two pieces of one region and never two regions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.ffn.agglomerate import (
    COLUMN,
    Contacts,
    MergeThresholds,
    ResegmentOptions,
    accept,
    agglomerate_array,
    contact_pairs,
    merge_contacts,
    pair_evidence,
)
from exaconnect.ffn.config import InferenceOptions, ModelConfig
from exaconnect.ffn.reseed import ReseedOptions, grow_unclaimed, merge_new_objects, unclaimed_seed_points

MODEL = ModelConfig(depth=1, fov_size=(9, 9, 9), deltas=(4, 4, 4), features=1)
INFERENCE = InferenceOptions(min_segment_size=10)


@dataclass
class Oracle:
    calls: int = 0

    def __call__(self, images, mask_logits):
        self.calls += 1
        centre = images[:, 4, 4, 4][:, None, None, None]
        z, y, x = np.mgrid[-4:5, -4:5, -4:5]
        bump = np.exp(-(z**2 + y**2 + x**2) / 20.0)
        return np.where(images == centre, 3.0 + bump, -4.0).astype(np.float32)


def _slabs(shape=(37, 35, 47)):
    """Three regions along x (intensities 100, 150, 200) between one-voxel dark membranes at
    x = 15 and x = 31; odd sizes so no axis is a multiple of a step."""
    image = np.full(shape, 20, np.uint8)
    truth = np.zeros(shape, np.uint64)
    for k, (lo, hi, value) in enumerate([(0, 15, 100), (16, 31, 150), (32, shape[2], 200)], start=1):
        image[:, :, lo:hi] = value
        truth[:, :, lo:hi] = k
    return image, truth


# ---------------------------------------------------------------- P2

def test_p2_claims_unclaimed_voxels_and_leaves_claimed_ones():
    image, truth = _slabs()
    labels = np.zeros(truth.shape, np.uint64)
    labels[truth == 1] = 7_000_000_001          # region 1 fully claimed (a large, stitched-looking ID)
    labels[(truth == 2) & (np.arange(truth.shape[0])[:, None, None] < 18)] = 12  # region 2: half claimed
    oracle = Oracle()
    result = grow_unclaimed(image, labels, oracle, MODEL, INFERENCE, ReseedOptions(min_segment_size=50))
    new = result.labels
    assert new.dtype == np.uint32
    assert not np.any(new[labels != 0]), "a claimed voxel was taken by a new object"
    # The unclaimed half of region 2 and all of region 3 became objects, each inside one region.
    for region in (2, 3):
        free = (truth == region) & (labels == 0)
        ids, counts = np.unique(new[free], return_counts=True)
        assert ids[np.argmax(counts)] != 0 and counts.max() > 0.8 * free.sum()
    for obj in np.unique(new[new > 0]):
        assert len(np.unique(truth[new == obj])) == 1
    assert result.counters["network-evaluations"] == oracle.calls > 0
    assert result.counters["p2-voxels-claimed"] == int((new > 0).sum())

    merged = merge_new_objects(labels, new, first_id=7_000_000_002)
    assert np.array_equal(merged[labels != 0], labels[labels != 0])
    assert merged[new > 0].min() >= 7_000_000_002


def test_p2_seeds_avoid_claimed_voxels_and_membranes():
    image, truth = _slabs()
    labels = np.where(truth == 1, 5, 0).astype(np.uint32)
    normalized = (image.astype(np.float32) - 128) / 33
    seeds = unclaimed_seed_points(normalized, labels, np.array([4, 4, 4]), ReseedOptions(min_seed_distance=2.0))
    assert len(seeds) > 0
    assert np.all(labels[tuple(seeds.T)] == 0)
    assert np.all(image[tuple(seeds.T)] != 20)
    assert np.all((seeds >= 4) & (seeds < np.array(labels.shape) - 4))
    everything = np.ones(labels.shape, np.uint32)
    assert len(unclaimed_seed_points(normalized, everything, np.array([4, 4, 4]), ReseedOptions())) == 0
    with pytest.raises(InputError, match="min_segment_size"):
        ReseedOptions(min_segment_size=0)


# ---------------------------------------------------------------- P3

def test_contacts_are_counted_once_and_points_lie_on_the_interface():
    labels = np.zeros((6, 7, 9), np.uint32)
    labels[:, :, :4] = 3
    labels[:, :, 5:] = 9  # a one-voxel gap at x = 4
    assert len(contact_pairs(labels, 1)) == 0
    contacts = contact_pairs(labels, 2)
    assert contacts.pairs.tolist() == [[3, 9]] and contacts.counts.tolist() == [6 * 7]
    assert contacts.points[0, 2] == 4  # the gap, midway between the two objects
    # Two boxes, each counting contacts that start in its own part, add up to the whole.
    left = contact_pairs(labels[:3], 2, owned=(3, 7, 9))
    right = contact_pairs(labels[3:], 2)
    both = merge_contacts([left, Contacts(right.pairs, right.counts, right.points + [3, 0, 0])])
    assert both.counts.tolist() == contacts.counts.tolist()


def test_p3_joins_two_pieces_of_one_object_and_not_two_objects():
    image, truth = _slabs()
    labels = truth.copy()
    # Region 1 split in two pieces (the P1 split P3 must repair); regions 2 and 3 left whole.
    labels[(truth == 1) & (np.arange(truth.shape[0])[:, None, None] >= 19)] = 4
    options = ResegmentOptions(radius=(12, 12, 12), analysis_radius=(8, 8, 8), max_contact_distance=2,
                               min_contact=5, min_object_voxels=20)
    result = agglomerate_array(image, labels, Oracle(), MODEL, INFERENCE, options, MergeThresholds(), batch_size=3)
    pairs = {tuple(p): bool(m) for p, m in zip(result.contacts.pairs.tolist(), result.merged)}
    assert pairs[(1, 4)] is True
    assert pairs[(1, 2)] is False and pairs[(2, 4)] is False and pairs[(2, 3)] is False
    row = result.evidence[result.contacts.pairs.tolist().index([1, 4])]
    assert row[COLUMN["iou"]] > 0.8 and row[COLUMN["a_cross"]] > 0.8 and row[COLUMN["b_cross"]] > 0.8
    assert np.array_equal(result.labels, truth)  # the pieces carry the smaller ID, 1
    assert result.counters["p3-merged-pairs"] == 1 and result.counters["p3-objects-after"] == 3
    assert result.counters["p3-voxels-changed"] == int((labels == 4).sum())


def test_evidence_and_thresholds():
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b = ~a
    whole = np.ones_like(a)
    one = pair_evidence(whole, whole, a, b, 0, 0, 6)
    assert one[COLUMN["iou"]] == 1.0 and one[COLUMN["a_cross"]] == 1.0 and one[COLUMN["evaluations"]] == 6
    two = pair_evidence(a, b, a, b, 0, 0, 4)
    assert two[COLUMN["iou"]] == 0.0 and two[COLUMN["a_self"]] == 1.0
    leaky = pair_evidence(whole, whole, a, b, 30, 0, 6)  # 30 of 64 voxels deleted on the way
    nan = np.full_like(one, np.nan)
    assert accept(np.stack([one, two, leaky, nan])).tolist() == [True, False, False, False]
    assert accept(leaky[None], MergeThresholds(max_deleted=0.5)).tolist() == [True]
    one_sided = pair_evidence(whole, b, a, b, 0, 0, 6)  # A's run covers B, B's run stays in B
    assert one_sided[COLUMN["a_cross"]] == 1.0 and one_sided[COLUMN["b_cross"]] == 0.0
    assert accept(one_sided[None], MergeThresholds(min_iou=0.5, min_cross=0.0)).tolist() == [True]
    assert accept(one_sided[None], MergeThresholds(min_iou=0.5, min_cross=0.0, min_cross_one=1.0)).tolist() == [True]
    assert accept(one_sided[None], MergeThresholds(min_iou=0.5)).tolist() == [False]
    with pytest.raises(InputError, match="min_iou"):
        MergeThresholds(min_iou=1.5)
    with pytest.raises(InputError, match="analysis_radius"):
        ResegmentOptions(radius=(4, 4, 4), analysis_radius=(8, 8, 8))
