"""Augmentation of FFN training examples: pure functions of arrays and a numpy Generator.

Geometric transforms act on image and labels alike. Axis permutations are only valid
between axes of equal voxel size (and equal patch size): on isotropic data all 6 orders of
(z, y, x) times 8 flip combinations give the 48 symmetries of the cube; with a coarser z only
y<->x may swap (16 transforms). Intensity changes, missing sections and misalignment mimic
what goes wrong in real EM stacks (reference `augmentation.py` and the FFN paper's training).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .config import AugmentConfig


@dataclass(frozen=True)
class Transform:
    permutation: tuple[int, int, int]  # new axis i takes old axis permutation[i] (z, y, x)
    flips: tuple[bool, bool, bool]

    def apply(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.permutation)
        flip_axes = tuple(i for i, f in enumerate(self.flips) if f)
        if flip_axes:
            out = np.flip(out, flip_axes)
        return np.ascontiguousarray(out)


def valid_transforms(resolution_xyz: Sequence[float], shape_zyx: Sequence[int], permute: bool = True,
                     flip: bool = True) -> list[Transform]:
    """Every permutation/flip that maps the voxel grid (and the patch) onto itself."""
    res_zyx = tuple(float(r) for r in reversed(tuple(resolution_xyz)))
    shape = tuple(int(s) for s in shape_zyx)
    perms = []
    for perm in itertools.permutations(range(3)):
        if not permute and perm != (0, 1, 2):
            continue
        if all(np.isclose(res_zyx[p], res_zyx[i]) and shape[p] == shape[i] for i, p in enumerate(perm)):
            perms.append(perm)
    flips = list(itertools.product((False, True), repeat=3)) if flip else [(False, False, False)]
    return [Transform(p, f) for p in perms for f in flips]  # type: ignore[arg-type]


def jitter_intensity(image: np.ndarray, rng: np.random.Generator, contrast: float, brightness: float) -> np.ndarray:
    scale = 1.0 + rng.uniform(-contrast, contrast) if contrast > 0 else 1.0
    shift = rng.uniform(-brightness, brightness) if brightness > 0 else 0.0
    return (image * np.float32(scale) + np.float32(shift)).astype(np.float32)


def drop_sections(image: np.ndarray, rng: np.random.Generator, probability: float, fill: float = 0.0) -> np.ndarray:
    """Each z-section is replaced by `fill` (0 = the mean of a normalized image) with `probability`."""
    if probability <= 0:
        return image
    missing = rng.random(image.shape[0]) < probability
    # The centre section is kept: an example whose seed voxel is invisible teaches nothing.
    missing[image.shape[0] // 2] = False
    if missing.any():
        image = image.copy()
        image[missing] = fill
    return image


def misalign(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, probability: float,
             max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """With `probability`, shifts the sections on one side of a random z by one (dy, dx) step.

    Labels move with the image: the object's true shape in the misaligned stack is what the
    network must learn to follow across the slip.
    """
    if probability <= 0 or max_shift <= 0 or rng.random() >= probability:
        return image, labels
    z = int(rng.integers(1, image.shape[0]))
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    if dy == 0 and dx == 0:
        return image, labels
    image = image.copy()
    labels = labels.copy()
    # The slab away from the centre moves, so the seed voxel stays on its object.
    part = slice(z, None) if z > image.shape[0] // 2 else slice(0, z)
    image[part] = ndimage.shift(image[part], (0, dy, dx), order=0, mode="nearest")
    labels[part] = ndimage.shift(labels[part], (0, dy, dx), order=0, mode="nearest")
    return image, labels


def augment_example(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: AugmentConfig,
                    transforms: Sequence[Transform]) -> tuple[np.ndarray, np.ndarray]:
    """One random augmentation of (normalized image, bool object mask)."""
    if transforms:
        t = transforms[int(rng.integers(len(transforms)))]
        image, labels = t.apply(image), t.apply(labels)
    image, labels = misalign(image, labels, rng, config.misalignment_probability, config.misalignment_max_shift)
    image = jitter_intensity(image, rng, config.contrast, config.brightness)
    image = drop_sections(image, rng, config.missing_section_probability)
    return image, labels
