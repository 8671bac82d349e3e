"""P2 of refinement: voxels that no object claimed after the first pass get another chance.

A first FFN pass leaves a fifth of FIB-25 unsegmented: seeds were never placed there, or an
object starting there was too weak or too small. Here new seeds are placed inside the
unclaimed space (peaks of its distance transform, away from membranes and from every claimed
voxel) and grown with the same network, with every claimed voxel frozen: the canvas holds the
existing objects, so the field of view never moves into them and a new object takes only
voxels that nobody owns. Objects already there are never changed; a new object that continues
an existing one is left for P3 (ffn/agglomerate.py) to join.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max

from exaconnect.errors import InputError

from .canvas import Canvas
from .config import InferenceOptions, ModelConfig
from .driver import drive
from .seeds import edge_distance, within_margin

# Marks every claimed voxel on the P2 canvas: one positive ID that no new object reaches, so
# the canvas's own rules (no FOV centre on a claimed voxel, new objects take only voxels <= 0)
# keep the existing segmentation as it is.
CLAIMED = np.iinfo(np.int32).max


@dataclass(frozen=True)
class ReseedOptions:
    """Where P2 seeds, and how big a new object must be.

    `min_seed_distance` (voxels): a seed's least distance to a claimed voxel or a membrane
    (adaptive-threshold edge of the image, as the peaks seed policy finds them); `peak_spacing`:
    least distance between two seeds; `min_segment_size`: unclaimed voxels a new object must
    take (smaller ones are dropped, as the first pass does with its own minimum);
    `membranes`: keep seeds off the image's edges (False: distance to claimed voxels only);
    `max_seeds`: at most this many seeds per subvolume, the most central first (0: all).
    """

    min_seed_distance: float = 2.0
    peak_spacing: int = 3
    min_segment_size: int = 300
    membranes: bool = True
    max_seeds: int = 0

    def __post_init__(self) -> None:
        if not float(self.min_seed_distance) >= 0:
            raise InputError(f"p2.min_seed_distance={self.min_seed_distance!r}: expected a number >= 0")
        if not isinstance(self.peak_spacing, int) or self.peak_spacing < 1:
            raise InputError(f"p2.peak_spacing={self.peak_spacing!r}: expected an integer >= 1")
        if not isinstance(self.min_segment_size, int) or self.min_segment_size < 1:
            raise InputError(f"p2.min_segment_size={self.min_segment_size!r}: expected an integer >= 1")
        if not isinstance(self.max_seeds, int) or self.max_seeds < 0:
            raise InputError(f"p2.max_seeds={self.max_seeds!r}: expected an integer >= 0")


@dataclass
class ReseedResult:
    """New objects only: `labels` holds 1..n on voxels that were unclaimed, 0 everywhere else."""

    labels: np.ndarray  # uint32 [z, y, x]
    seeds: np.ndarray  # [k, 3] z, y, x: every seed tried, in visit order
    counters: dict


def _check(image: np.ndarray, labels: np.ndarray) -> None:
    if image.ndim != 3 or image.shape != labels.shape:
        raise InputError(f"P2: image {image.shape} and labels {labels.shape}: expected two 3-d arrays of one shape")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"P2: labels have dtype {labels.dtype}; expected integers")


def unclaimed_seed_points(normalized_image: np.ndarray, labels: np.ndarray, margin, options: ReseedOptions) -> np.ndarray:
    """Seeds [n, 3] (z, y, x) in unclaimed voxels, most central first.

    The free space is the unclaimed voxels minus the image's membranes; seeds are the local
    maxima of its distance transform that lie at least `min_seed_distance` from its border and
    whose field of view fits inside the array (`margin`, per axis)."""
    _check(normalized_image, labels)
    free = labels == 0
    if options.membranes:
        free &= edge_distance(normalized_image) > 0
    # Only where a field of view fits: the distance then also grows away from the box's edge,
    # so a region cut by it is seeded in its middle, not against the edge.
    inner = np.zeros(free.shape, bool)
    inner[tuple(slice(int(m), int(s - m)) for m, s in zip(margin, free.shape))] = True
    free &= inner
    if not free.any():
        return np.zeros((0, 3), np.int64)
    distance = ndimage.distance_transform_edt(free).astype(np.float32)
    # Plateaus are broken by fixed, tiny noise so the result never depends on global state.
    noise = np.random.RandomState(25).random_sample(distance.shape).astype(np.float32) * 1e-3
    peaks = peak_local_max(distance + noise * free, min_distance=options.peak_spacing,
                           threshold_abs=max(float(options.min_seed_distance), 1e-6), exclude_border=False)
    peaks = within_margin(np.asarray(peaks, np.int64).reshape(-1, 3), labels.shape, np.asarray(margin))
    if len(peaks) == 0:
        return peaks
    depth = distance[tuple(peaks.T)]
    order = np.lexsort((peaks[:, 2], peaks[:, 1], peaks[:, 0], -depth))
    peaks = peaks[order]
    return peaks[: options.max_seeds] if options.max_seeds else peaks


def grow_unclaimed(
    image: np.ndarray,
    labels: np.ndarray,
    network: Callable[[np.ndarray, np.ndarray], np.ndarray],
    model: ModelConfig,
    inference: InferenceOptions,
    options: ReseedOptions = ReseedOptions(),
    seeds: np.ndarray | None = None,
) -> ReseedResult:
    """New FFN objects in the voxels `labels` leaves at 0, grown from `seeds` (default:
    `unclaimed_seed_points`) with `network`; no voxel of `labels` > 0 is ever taken.

    `image` is the raw EM box (uint8 or float, normalised with `inference`'s mean and stddev as
    the first pass does); `labels` any integer labels of the same box."""
    _check(image, labels)
    claimed = labels != 0
    if seeds is None:
        # The same normalisation as the canvas's, so seeds see the image the network sees.
        normalized = (image.astype(np.float32) - np.float32(inference.image_mean)) / np.float32(inference.image_stddev)
        seeds = unclaimed_seed_points(normalized, labels, np.array(model.fov_zyx) // 2, options)
    seeds = np.asarray(seeds, np.int64).reshape(-1, 3)
    counters = {"p2-seeds": int(len(seeds)), "p2-unclaimed-voxels-before": int((~claimed).sum())}
    if len(seeds) == 0:
        return ReseedResult(np.zeros(labels.shape, np.uint32), seeds, {**counters, "network-evaluations": 0,
                                                                       "p2-objects": 0, "p2-voxels-claimed": 0})
    canvas_options = replace(inference, seed_policy="list", seeds=tuple(tuple(int(v) for v in s) for s in seeds),
                             seed_order="forward", min_segment_size=int(options.min_segment_size))
    canvas = Canvas(image, model, canvas_options)
    canvas.segmentation[claimed] = CLAIMED
    result = drive([canvas.segment_all()], network, batch_size=1)
    new = canvas.segmentation.copy()
    new[claimed] = 0
    new[new < 0] = 0
    objects = int(len(canvas.objects))
    counters.update({k: v for k, v in canvas.counters.items() if isinstance(v, (int, float))})
    counters.update({"network-evaluations": int(result.evaluations[0]), "time-network-s": round(result.network_s, 3),
                     "p2-objects": objects, "p2-voxels-claimed": int((new > 0).sum())})
    return ReseedResult(new.astype(np.uint32), seeds, counters)


def merge_new_objects(labels: np.ndarray, new: np.ndarray, first_id: int) -> np.ndarray:
    """`labels` with the new objects' voxels (where `labels` is 0) as `first_id + new - 1`."""
    if labels.shape != new.shape:
        raise InputError(f"P2: labels {labels.shape} and new objects {new.shape} differ in shape")
    out = np.array(labels, dtype=np.uint64, copy=True)
    take = (new > 0) & (out == 0)
    out[take] = np.uint64(first_id) + new[take].astype(np.uint64) - np.uint64(1)
    return out
