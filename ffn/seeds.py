"""Seed policies: where the FFN tries to start new objects, as (z, y, x) arrays in visit order.

`peaks_seeds` reproduces google/ffn `seed.PolicyPeaks`: local maxima of the distance to the
nearest edge voxel, where "edge" means the 3-D Sobel gradient magnitude exceeds its own
Gaussian-smoothed value (an adaptive threshold). Points far from membranes are the likely
interiors of neurites, the safest places to start flood filling.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max

from exaconnect.errors import InputError

# Reference constants (seed.PolicyPeaks): sigma of the adaptive threshold, the peak spacing,
# the tie-breaking noise amplitude and the fixed seed of that noise.
EDGE_SMOOTHING_SIGMA = 49.0 / 6.0
PEAK_MIN_DISTANCE = 3
TIE_BREAK_NOISE = 1e-4
TIE_BREAK_SEED = 42


def edge_distance(image: np.ndarray) -> np.ndarray:
    """Distance (voxels) from each voxel to the nearest adaptive-threshold edge voxel."""
    edges = ndimage.generic_gradient_magnitude(image.astype(np.float32), ndimage.sobel)
    threshold = np.zeros(edges.shape, dtype=np.float32)
    ndimage.gaussian_filter(edges, EDGE_SMOOTHING_SIGMA, output=threshold, mode="reflect")
    edge_mask = edges > threshold
    return ndimage.distance_transform_edt(1 - edge_mask).astype(np.float32)


def peaks_seeds(image: np.ndarray) -> np.ndarray:
    """Seed points [n, 3] (z, y, x) in ascending lexicographic order.

    `image` should be the normalized float image the network sees, as in the reference (the
    policy reads `canvas.image`). Plateaus of the distance transform are broken by small
    uniform noise drawn from a generator seeded with 42, so the result does not depend on
    any global random state.
    """
    if image.ndim != 3:
        raise InputError(f"image shape {image.shape}: expected a 3-D (z, y, x) array")
    dt = edge_distance(image)
    noise = np.random.RandomState(TIE_BREAK_SEED).random_sample(dt.shape)
    peaks = peak_local_max(
        dt + noise * TIE_BREAK_NOISE,
        min_distance=PEAK_MIN_DISTANCE,
        threshold_abs=0,
        threshold_rel=0,
    )
    # The reference sorts ascending to keep the order of skimage < 0.13.
    order = np.lexsort(peaks.T[::-1]) if len(peaks) else np.zeros(0, dtype=int)
    return np.asarray(peaks, dtype=np.int64).reshape(-1, 3)[order]


def list_seeds(seeds, shape: tuple[int, int, int]) -> np.ndarray:
    """A fixed seed list [n, 3] (z, y, x), kept in the given order and checked to lie in `shape`."""
    points = np.asarray(seeds, dtype=np.int64).reshape(-1, 3)
    outside = np.any((points < 0) | (points >= np.asarray(shape)), axis=1)
    if np.any(outside):
        raise InputError(f"seeds {points[outside].tolist()} lie outside the volume of shape {shape}")
    return points


def within_margin(points: np.ndarray, shape: tuple[int, int, int], margin: np.ndarray) -> np.ndarray:
    """The points whose FOV fits inside the volume (reference BaseSeedPolicy early filter)."""
    keep = np.all(points - margin >= 0, axis=1) & np.all(points + margin < np.asarray(shape), axis=1)
    return points[keep]
