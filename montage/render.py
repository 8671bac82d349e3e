"""Render any box of a stitched section from only the tiles that touch it.

Each tile is sampled at its solved (sub-pixel) position with bilinear interpolation, corrected by
its gain and offset, and blended with weights that fall linearly to the tile's edge (distance to
the nearest edge, "feathering"): in an overlap the weight passes smoothly from one tile to the
other, so no seam shows even where the tiles differ slightly. Pixels without signal (empty or
saturated) and tiles marked as such keep a tiny weight: used only where nothing else covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from exaconnect.montage.match import signal_mask

# Weight left to pixels without signal: enough to fill a hole, never enough to show in a blend.
FALLBACK_WEIGHT = 1e-6


@dataclass(frozen=True)
class PlacedTile:
    """A tile's pixels, its top-left position (x, y) in the section, gain/offset and a weight
    factor (FALLBACK_WEIGHT for a tile that could not be trusted to carry signal)."""

    pixels: np.ndarray
    x: float
    y: float
    gain: float = 1.0
    offset: float = 0.0
    weight: float = 1.0


def tiles_touching(box: tuple[int, int, int, int], positions: np.ndarray, shapes: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of tiles whose footprint (at `positions` (x, y), shapes (h, w)) meets the box
    (x0, y0, x1, y1): pixel centres within its footprint, [x - 0.5, x + w - 0.5)."""
    x0, y0, x1, y1 = box
    out = []
    for i, ((x, y), (h, w)) in enumerate(zip(positions, shapes)):
        if np.ceil(x - 0.5) < x1 and np.ceil(x + w - 0.5) > x0 and np.ceil(y - 0.5) < y1 and np.ceil(y + h - 0.5) > y0:
            out.append(i)
    return out


def _edge_weight(h: int, w: int, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Distance (px) to the tile's nearest edge (positive on the whole footprint)."""
    return np.maximum(np.minimum(np.minimum(v + 0.5, h - 0.5 - v), np.minimum(u + 0.5, w - 0.5 - u)), 1e-3)


def render_box(box: tuple[int, int, int, int], tiles: Sequence[PlacedTile], dtype: str | np.dtype) -> np.ndarray:
    """The section's pixels in box (x0, y0, x1, y1) as [y, x] of `dtype` (0 where no tile covers)."""
    x0, y0, x1, y1 = box
    total = np.zeros((y1 - y0, x1 - x0), np.float64)
    weights = np.zeros_like(total)
    for tile in tiles:
        h, w = tile.pixels.shape
        # Output pixels whose centre falls on the tile's footprint, -0.5 <= X - x < w - 0.5 (the
        # outermost half pixel takes the edge pixel's value).
        cx0, cx1 = max(x0, int(np.ceil(tile.x - 0.5))), min(x1, int(np.ceil(tile.x + w - 0.5)))
        cy0, cy1 = max(y0, int(np.ceil(tile.y - 0.5))), min(y1, int(np.ceil(tile.y + h - 0.5)))
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        u = np.arange(cx0, cx1) - tile.x
        v = np.arange(cy0, cy1) - tile.y
        # Only the part of the tile under the box is resampled.
        ru0, ru1 = max(0, int(np.floor(u[0]))), min(w, int(np.floor(u[-1])) + 2)
        rv0, rv1 = max(0, int(np.floor(v[0]))), min(h, int(np.floor(v[-1])) + 2)
        patch = tile.pixels[rv0:rv1, ru0:ru1]
        vv, uu = np.meshgrid(v - rv0, u - ru0, indexing="ij")
        values = ndimage.map_coordinates(patch.astype(np.float32), [vv, uu], order=1, mode="nearest")
        signal = ndimage.map_coordinates(signal_mask(patch).astype(np.float32), [vv, uu], order=1, mode="nearest") > 0.999
        weight = _edge_weight(h, w, vv + rv0, uu + ru0) * tile.weight
        weight = np.where(signal, weight, weight * FALLBACK_WEIGHT)
        at = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        total[at] += weight * (tile.gain * values + tile.offset)
        weights[at] += weight
    out = np.divide(total, weights, out=np.zeros_like(total), where=weights > 0)
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(dtype)
