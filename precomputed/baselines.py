"""What a segmentation has to beat to mean anything, computed on the same volume.

- **empty**: label 0 everywhere, scored as one segment. It splits nothing, so its VI is all
  merge (the entropy of the ground truth), and on a small volume of a few large objects it is
  a low bar to clear only in appearance: a network that leaves most voxels unsegmented and
  splits the rest scores worse.
- **watershed**: a seeded watershed of the image, no learning at all. Seeds are the peaks of
  the distance to dark (membrane) voxels of the smoothed image; the basins flood the inverted
  smoothed intensity, so every voxel gets a label, as in the ground truth.

Pure functions of arrays ([z, y, x]); the evaluate service scores them beside the segmentation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from exaconnect.errors import InputError


@dataclass(frozen=True)
class WatershedParameters:
    """Seeded watershed settings. `threshold` None: Otsu's threshold of the smoothed image, so
    one default works on images of any brightness (EM: bright cytoplasm, dark membranes).

    The defaults were chosen on the demo's synthetic volumes of seeds 3, 4 and 5, misaligned and
    aligned like the demo's (docs/segment.md), never on the demo volume itself (seed 0)."""

    sigma: float = 0.5  # voxels of Gaussian smoothing before thresholding and flooding
    # Smoothed intensity above which a voxel is cytoplasm. Otsu: a fixed 100 did a little better on
    # the demo's synthetic images (mean VI 1.52 vs 1.62 on seeds 3-5) but means nothing elsewhere.
    threshold: float | None = None
    min_distance: int = 10  # voxels between two seeds (peaks of the distance to membranes)

    def __post_init__(self) -> None:
        if not (isinstance(self.sigma, (int, float)) and self.sigma >= 0):
            raise InputError(f"watershed sigma={self.sigma!r}: expected a number >= 0 (voxels)")
        if self.threshold is not None and not isinstance(self.threshold, (int, float)):
            raise InputError(f"watershed threshold={self.threshold!r}: expected an intensity or null (Otsu)")
        if isinstance(self.min_distance, bool) or not isinstance(self.min_distance, int) or self.min_distance < 1:
            raise InputError(f"watershed min_distance={self.min_distance!r}: expected an integer >= 1 (voxels)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "WatershedParameters":
        data = dict(data or {})
        unknown = sorted(set(data) - {"sigma", "threshold", "min_distance"})
        if unknown:
            raise InputError(f"watershed parameters {unknown}: unknown; expected sigma, threshold, min_distance")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def empty_segmentation(shape: tuple[int, ...]) -> np.ndarray:
    """Label 0 everywhere: one segment over the whole volume."""
    return np.zeros(shape, dtype=np.uint32)


def watershed_segmentation(image: np.ndarray, parameters: WatershedParameters = WatershedParameters()) -> np.ndarray:
    """uint32 labels [z, y, x] of a seeded watershed of `image` (every voxel labelled, unless the
    image has no voxel above the threshold: then one segment, as empty)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    if image.ndim != 3:
        raise InputError(f"watershed baseline: image has shape {image.shape}; expected a 3-D [z, y, x] array")
    smooth = ndimage.gaussian_filter(image.astype(np.float32), parameters.sigma)
    if parameters.threshold is not None:
        threshold = float(parameters.threshold)
    elif smooth.min() == smooth.max():
        threshold = float(smooth.max())
    else:
        threshold = float(threshold_otsu(smooth))
    inside = smooth > threshold
    if not inside.any():
        return empty_segmentation(image.shape)
    distance = ndimage.distance_transform_edt(inside)
    peaks = peak_local_max(distance, min_distance=parameters.min_distance, labels=inside.astype(np.int32),
                           exclude_border=False)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return watershed(-smooth, markers).astype(np.uint32)


def baseline_scores(image: np.ndarray | None, groundtruth: np.ndarray, score,
                    watershed: WatershedParameters = WatershedParameters()) -> dict[str, dict[str, Any]]:
    """{"empty": scores, "watershed": scores + parameters} for the box of `groundtruth`, each
    scored by `score(segmentation, groundtruth) -> dict` (the caller's convention for label 0);
    without an image only the empty baseline."""
    baselines: dict[str, dict[str, Any]] = {"empty": dict(score(empty_segmentation(groundtruth.shape), groundtruth))}
    if image is not None:
        if image.shape != groundtruth.shape:
            raise InputError(f"baselines: image box {image.shape} differs from ground truth box {groundtruth.shape}; "
                             "expected the same box")
        labels = watershed_segmentation(image, watershed)
        baselines["watershed"] = {**score(labels, groundtruth), "parameters": watershed.to_dict()}
    return baselines
