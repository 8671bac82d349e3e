"""Per-voxel loss weights of a training example: the rim just outside the object.

Plain functions of arrays (no TensorFlow), so they can be tested on their own.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def outside_rim(mask: np.ndarray, radius: int) -> np.ndarray:
    """Voxels outside `mask` within `radius` 6-connected steps of it (the membrane and the
    neighbour's edge a leak would cross first)."""
    if radius < 1:
        raise ValueError(f"radius={radius!r}: expected >= 1")
    mask = np.asarray(mask, dtype=bool)
    grown = ndimage.binary_dilation(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    iterations=radius)
    return grown & ~mask


def boundary_weights(mask: np.ndarray, weight: float, radius: int) -> np.ndarray | None:
    """float32 weights, `weight` on the outside rim of `mask` and 1 elsewhere; None when
    `weight` is 1 (every voxel alike: the caller can skip the multiplication)."""
    if weight == 1.0:
        return None
    weights = np.ones(mask.shape, dtype=np.float32)
    weights[outside_rim(mask, radius)] = np.float32(weight)
    return weights
