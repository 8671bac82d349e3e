"""Rendering: resample a section through its mesh, one output region at a time.

A mesh (align.mesh) maps output node `stride * (i, j)` to a position in the section's pixels;
between nodes the map is bilinear. Rendering a region needs only the source pixels its map
touches (`source_window`), which is what lets render tasks read one chunk's worth of input.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from exaconnect.align.flow import dense_field, grid_points


def region_map(mesh: np.ndarray, stride: int, region: tuple[int, int, int, int]) -> np.ndarray:
    """Source positions [h, w, 2] of output pixels y0:y1, x0:x1 (`region` = y0, y1, x0, x1).
    The displacement is interpolated (constant beyond the grid), not the positions; separable
    bilinear weights over only the mesh rows and columns the region touches."""
    y0, y1, x0, x1 = region
    gy, gx = mesh.shape[:2]
    identity = grid_points(((gy - 1) * stride + 1, (gx - 1) * stride + 1), stride)
    disp = dense_field(mesh - identity, stride, (y1 - y0, x1 - x0), (y0, x0))
    disp[..., 0] += np.arange(y0, y1, dtype=np.float64)[:, None]
    disp[..., 1] += np.arange(x0, x1, dtype=np.float64)[None, :]
    return disp


def source_window(positions: np.ndarray, margin: int, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Integer source box (y0, y1, x0, x1) covering `positions` plus the interpolation margin,
    clipped to a section of `shape`; None where the region maps entirely outside it."""
    y0 = int(np.floor(positions[..., 0].min())) - margin
    y1 = int(np.ceil(positions[..., 0].max())) + margin + 1
    x0 = int(np.floor(positions[..., 1].min())) - margin
    x1 = int(np.ceil(positions[..., 1].max())) + margin + 1
    y0, x0 = max(y0, 0), max(x0, 0)
    y1, x1 = min(y1, shape[0]), min(x1, shape[1])
    if y1 <= y0 or x1 <= x0:
        return None
    return y0, y1, x0, x1


def warp_region(source: np.ndarray, origin: tuple[int, int], positions: np.ndarray, order: int = 3,
                section_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample `source` (a window of the section whose first pixel is `origin`) at `positions`.

    Returns (image float32, valid mask): invalid where the position falls outside the section
    (those pixels are 0, the fill every reader of the layer treats as 'no data').
    """
    coords = [positions[..., 0] - origin[0], positions[..., 1] - origin[1]]
    # 'nearest' beyond the window: the window already holds every pixel a valid position needs,
    # and positions outside the section are zeroed below.
    out = ndimage.map_coordinates(source.astype(np.float32), coords, order=order, mode="nearest")
    shape = section_shape if section_shape is not None else (origin[0] + source.shape[0], origin[1] + source.shape[1])
    eps = 1e-6  # interpolated positions land a rounding error off an exact edge
    valid = (
        (positions[..., 0] >= -eps) & (positions[..., 0] <= shape[0] - 1 + eps)
        & (positions[..., 1] >= -eps) & (positions[..., 1] <= shape[1] - 1 + eps)
    )
    return np.where(valid, out, 0.0).astype(np.float32), valid


def render_section(section: np.ndarray, mesh: np.ndarray, stride: int, out_shape: tuple[int, int] | None = None,
                   order: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A whole section through its mesh (for tests, reports and small stacks)."""
    out_shape = out_shape or section.shape
    positions = region_map(mesh, stride, (0, out_shape[0], 0, out_shape[1]))
    return warp_region(section, (0, 0), positions, order=order, section_shape=section.shape)


def to_dtype(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip a rendered float image into an integer layer's range (cubic overshoots)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(image), info.min, info.max).astype(dtype)
    return image.astype(dtype)
