"""Dense fill: hands the voxels an FFN left unsegmented to the FFN objects around them.

FFN inference labels only what the network is confident about; the rest stays 0 (about 11 %
of FIB-25 for the fully trained reference model, a third for a model trained for minutes).
Downstream tools that want a dense volume (meshing whole cells, dense-label metrics,
synapse assignment) then see one huge "0" body. `fill_unsegmented` grows every FFN object
into the unsegmented voxels, flooding the smoothed image from the bright cytoplasm towards
the dark membranes (a marker watershed, `skimage.segmentation.watershed`), so a gap is
claimed by the object it is connected to through the brightest path. It adds no objects
and never changes a voxel the FFN labelled: every object identity still comes from the FFN.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from exaconnect.errors import InputError


def fill_unsegmented(image: np.ndarray, labels: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """`labels` [z, y, x] with its zeros assigned to neighbouring objects along `image`.

    `image` is the EM image of the same box (bright interiors, dark membranes); `sigma`
    (voxels) smooths it first, as noise would otherwise decide the flooding order. Zeros
    that cannot reach any object (an all-zero `labels`) stay zero. The dtype is kept.
    """
    if image.shape != labels.shape or image.ndim != 3:
        raise InputError(f"fill_unsegmented: image {image.shape} and labels {labels.shape}: "
                         "expected two 3-D arrays of the same shape")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"fill_unsegmented: labels have dtype {labels.dtype}; expected integers")
    if not sigma >= 0:
        raise InputError(f"fill_unsegmented: sigma={sigma!r}; expected a number >= 0")
    if not labels.any() or labels.all():
        return labels.copy()
    from skimage.segmentation import watershed

    # skimage wants signed markers; compact ids make any uint64 ids safe. Zeros are present
    # here, so ids[0] == 0 and compact 0 is exactly "unsegmented".
    ids, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(labels.shape).astype(np.int32 if len(ids) < 2**31 else np.int64)
    smooth = ndimage.gaussian_filter(image.astype(np.float32), sigma) if sigma > 0 else image.astype(np.float32)
    grown = watershed(-smooth, markers=compact)
    return ids[grown].astype(labels.dtype, copy=False)


# The six face neighbours of every voxel of an array padded by one voxel on each side.
_FACES = tuple(
    tuple(slice(1 + d, -1 + d if -1 + d else None) if axis == a else slice(1, -1) for a in range(3))
    for axis in range(3) for d in (-1, 1)
)


def open_objects(labels: np.ndarray, radius: int) -> np.ndarray:
    """Every object of `labels` ([z, y, x]) opened by a diamond of `radius` voxels, each on its
    own: the parts of an object thinner than about 2 * radius + 1 voxels (a thin neurite it
    reached into, a bridge to one) go back to 0; the rest is unchanged. No voxel changes object.

    Why: a dense object often holds a node or two of the thin neurite beside it, and one such
    node makes the whole object a merger in skeleton terms; on training_sample2 opening the
    filled segmentation by 2 voxels doubles its expected run length for 0.06 of VI
    (docs/refine.md). The array's faces are not object boundaries (outside is taken to continue
    the volume), so a subvolume read with a margin of 2 * radius opens its core as the whole
    volume would."""
    if labels.ndim != 3:
        raise InputError(f"open_objects: labels have shape {labels.shape}; expected a 3-D [z, y, x] array")
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise InputError(f"open radius {radius!r}: expected an integer >= 0 (voxels)")
    if radius == 0 or not labels.any():
        return labels.copy()
    core = labels
    for _ in range(radius):
        padded = np.pad(core, 1, mode="edge")
        keep = core != 0
        for face in _FACES:
            keep &= padded[face] == core
        core = np.where(keep, core, 0).astype(labels.dtype, copy=False)
    opened = core
    for _ in range(radius):
        padded = np.pad(opened, 1, mode="edge")
        grown = opened.copy()
        for face in _FACES:
            neighbour = padded[face]
            # Growth stays inside each object's own voxels, so all candidates for a voxel agree.
            take = (grown == 0) & (neighbour != 0) & (neighbour == labels)
            grown[take] = neighbour[take]
        opened = grown
    return opened
