"""A deterministic synthetic EM-like volume with its true labels: the built-in sample that needs
no network.

Neurites are branching random walks; every voxel belongs to the nearest walk (so objects touch
and fill space, as in dense neuropil); boundaries between objects are dark membranes; insides
carry per-object brightness and smooth texture; the image is blurred and noisy like EM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from exaconnect.errors import InputError


@dataclass(frozen=True)
class SyntheticSpec:
    shape: tuple[int, int, int] = (96, 96, 96)  # z, y, x
    neurites: int = 14
    branch_probability: float = 0.02
    membrane_width: float = 1.0
    noise_sigma: float = 10.0
    blur_sigma: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise InputError(f"synthetic shape {self.shape}: expected three sizes of at least 16")
        if self.neurites < 1:
            raise InputError("synthetic neurites must be at least 1")


def _walk(rng: np.random.Generator, shape: np.ndarray, start: np.ndarray, direction: np.ndarray,
          branch_probability: float, depth: int = 0) -> list[np.ndarray]:
    """Points of one smooth random walk (and its branches) until it leaves the volume."""
    points = []
    position = start.astype(float)
    direction = direction / np.linalg.norm(direction)
    for _ in range(int(4 * shape.max())):
        direction = direction + rng.normal(0, 0.15, 3)
        direction /= np.linalg.norm(direction)
        position = position + direction
        if np.any(position < 0) or np.any(position >= shape):
            break
        points.append(position.copy())
        if depth < 2 and rng.random() < branch_probability:
            side = np.cross(direction, rng.normal(size=3))
            side /= np.linalg.norm(side) + 1e-9
            points += _walk(rng, shape, position, direction + 1.5 * side, branch_probability / 2, depth + 1)
    return points


def synthetic_labels(spec: SyntheticSpec) -> np.ndarray:
    """uint32 [z, y, x] labels 1..N that tile the whole volume."""
    rng = np.random.default_rng(spec.seed)
    shape = np.array(spec.shape)
    seeds = np.zeros(spec.shape, dtype=np.uint32)
    label = 0
    for _ in range(spec.neurites):
        # Start on a random face, heading inward, so neurites cross the volume like axons do.
        axis = rng.integers(3)
        start = rng.uniform(0, shape - 1)
        start[axis] = 0 if rng.random() < 0.5 else shape[axis] - 1
        direction = rng.normal(0, 0.5, 3)
        direction[axis] = 1.0 if start[axis] == 0 else -1.0
        points = _walk(rng, shape, start, direction, spec.branch_probability)
        if len(points) < 8:
            continue
        label += 1
        idx = np.clip(np.round(np.array(points)).astype(int), 0, shape - 1)
        seeds[idx[:, 0], idx[:, 1], idx[:, 2]] = label
    if label == 0:
        raise InputError(f"synthetic seed {spec.seed} produced no neurites; try another seed")
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(nearest)]
    return labels


def membrane_mask(labels: np.ndarray) -> np.ndarray:
    """Voxels touching a different label along any axis."""
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        differs = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        boundary[tuple(lo)] |= differs
        boundary[tuple(hi)] |= differs
    return boundary


def synthetic_image(labels: np.ndarray, spec: SyntheticSpec) -> np.ndarray:
    """uint8 [z, y, x] EM-like image for `labels`: bright cytoplasm, dark membranes."""
    rng = np.random.default_rng(spec.seed + 1_000_003)
    brightness = rng.uniform(150, 200, int(labels.max()) + 1)
    image = brightness[labels].astype(np.float32)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, labels.shape).astype(np.float32), 2.0)
    image += 40 * texture / (texture.std() + 1e-6) * 0.3
    membranes = membrane_mask(labels)
    if spec.membrane_width > 1:
        membranes = ndimage.binary_dilation(membranes, iterations=int(spec.membrane_width) - 1)
    image[membranes] = 60
    image = ndimage.gaussian_filter(image, spec.blur_sigma)
    image += rng.normal(0, spec.noise_sigma, labels.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def synthetic_volume(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8, labels uint32), both [z, y, x]; the same seed always gives the same volume."""
    labels = synthetic_labels(spec)
    return synthetic_image(labels, spec), labels
