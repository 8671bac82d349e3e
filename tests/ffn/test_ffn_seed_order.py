"""`seed_order='reverse'`: the same seeds tried last-first, which changes which object claims
contested voxels (what a refinement pass's split consensus compares)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.ffn.config import FFNConfig, InferenceOptions, ModelConfig
from exaconnect.ffn.inference import segment_subvolume
from exaconnect.precomputed.stitching import split_consensus

MODEL = ModelConfig(depth=1, fov_size=(9, 9, 9), deltas=(4, 4, 4), features=1)


@dataclass
class LeakyOracle:
    """Calls 'inside' the FOV voxels of the centre's grey level; an object grown from grey 100
    or 200 also leaks into grey 150 (through the membrane), so which merge happens depends
    on which slab is seeded first."""

    config: FFNConfig

    @property
    def model_config(self):
        return self.config.model

    def __call__(self, images, mask_logits):
        grey = np.rint(images * 33.0 + 128.0)  # images arrive normalized by (v - 128) / 33
        centre = grey[:, 4, 4, 4][:, None, None, None]
        z, y, x = np.mgrid[-4:5, -4:5, -4:5]
        bump = np.exp(-(z**2 + y**2 + x**2) / 20.0)
        inside = (grey == centre) | ((centre != 150) & (grey == 150))
        return np.where(inside, 3.0 + bump, -4.0).astype(np.float32)


def slabs() -> np.ndarray:
    """Slabs of grey 100, 150 and 200 along x, split by one-voxel dark membranes."""
    image = np.full((41, 41, 45), 20, np.uint8)
    for lo, hi, value in ((0, 15, 100), (16, 31, 150), (32, 45, 200)):
        image[:, :, lo:hi] = value
    return image


def test_reverse_order_merges_the_other_way_and_their_consensus_splits_both():
    options = InferenceOptions(seed_policy="list", seeds=[(20, 20, 4), (20, 20, 20), (20, 20, 36)],
                               min_segment_size=100)
    oracle = LeakyOracle(FFNConfig(model=MODEL, inference=options))
    image = slabs()
    forward = segment_subvolume(image, oracle, options).labels
    reverse = segment_subvolume(image, oracle, replace(options, seed_order="reverse")).labels
    left, middle, right = (20, 20, 4), (20, 20, 20), (20, 20, 36)
    # Forward: slab 100 is seeded first and swallows slab 150; reverse: slab 200 does.
    assert forward[left] == forward[middle] != forward[right] != 0
    assert reverse[right] == reverse[middle] != reverse[left] != 0
    agreed = split_consensus(forward, reverse)
    assert len({int(agreed[p]) for p in (left, middle, right)} - {0}) == 3


def test_seed_order_is_checked():
    with pytest.raises(InputError, match="seed_order"):
        InferenceOptions(seed_order="random")
