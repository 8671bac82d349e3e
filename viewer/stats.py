"""Display defaults from a small sample of a layer's data.

Only a few chunks of the lowest-resolution mip are read (the block around the centre of the
layer, at most `max_chunks` chunks along each axis), so that building a link stays cheap for a
teravoxel layer: a downsampled sample has nearly the same intensity histogram as the whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exaconnect.errors import LayerError
from exaconnect.viewer.layers import LayerInfo

# 1st/99th percentiles clip the few saturated or empty voxels (resin, cut edges) that would
# otherwise squash the contrast of the tissue.
DEFAULT_PERCENTILES = (1.0, 99.0)


@dataclass(frozen=True)
class LayerSample:
    """Voxels read for display defaults, and where they came from."""

    data: np.ndarray  # [x, y, z, channel], as cloud-volume returns it
    mip: int


def sample_center(layer: LayerInfo, max_chunks: int = 2) -> LayerSample:
    """Read up to `max_chunks`^3 chunks around the centre of the lowest-resolution mip."""
    from cloudvolume import CloudVolume

    mip = len(layer.info["scales"]) - 1
    scale = layer.info["scales"][mip]
    offset = np.array(scale["voxel_offset"], dtype=np.int64)
    size = np.array(scale["size"], dtype=np.int64)
    chunk = np.array(scale["chunk_sizes"][0], dtype=np.int64)
    extent = np.minimum(size, chunk * max_chunks)
    start = offset + (size - extent) // 2
    stop = start + extent
    try:
        vol = CloudVolume(layer.url, mip=mip, progress=False, fill_missing=True)
        data = np.asarray(vol[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]])
    except Exception as exc:  # cloud-volume raises many transport- and codec-specific errors
        raise LayerError(f"layer {layer.url}: cannot read mip {mip} for display defaults ({exc})") from exc
    return LayerSample(data=data, mip=mip)


def intensity_range(
    sample: LayerSample, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> tuple[float, float]:
    """A percentile range of the sample for an `invlerp` control; never empty."""
    values = sample.data[..., 0].ravel()
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if high <= low:
        # A constant sample (e.g. an empty, not yet written layer): widen so invlerp is defined.
        high = low + 1.0
    return low, high


def frequent_segments(sample: LayerSample, limit: int = 12) -> list[int]:
    """The `limit` most frequent non-zero ids in the sample, largest first.

    Selecting these by default makes the 3D panel show meshes of the objects that fill the
    view instead of an empty black panel.
    """
    ids, counts = np.unique(sample.data[..., 0], return_counts=True)
    keep = ids != 0
    ids, counts = ids[keep], counts[keep]
    order = np.argsort(-counts, kind="stable")[:limit]
    return [int(i) for i in ids[order]]
