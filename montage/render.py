"""Render any box of a stitched section from only the tiles that touch it.

Each tile is sampled at its solved (sub-pixel) position with bilinear interpolation, corrected by
its gain and offset, and blended with weights that fall linearly to the tile's edge (distance to
the nearest edge, "feathering"): in an overlap the weight passes smoothly from one tile to the
other, so no seam shows even where the tiles differ slightly. Pixels without signal (empty or
saturated) and tiles marked as such keep a tiny weight: used only where nothing else covers.

A tile with a relaxed mesh (elastic.py) is sampled through the mesh's inverse instead of a pure
translation: the output pixels near its footprint are mapped to the tile pixels they show, and
those that land outside the tile take no part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from exaconnect.montage.elastic import mesh_coordinates
from exaconnect.montage.match import signal_mask

# Weight left to pixels without signal: enough to fill a hole, never enough to show in a blend.
FALLBACK_WEIGHT = 1e-6


@dataclass(frozen=True)
class PlacedTile:
    """A tile's pixels, its top-left position (x, y) in the section, gain/offset, a weight
    factor (FALLBACK_WEIGHT for a tile that could not be trusted to carry signal) and, after
    elastic refinement, its mesh's node displacements [cells + 1, cells + 1, 2] (x, y)."""

    pixels: np.ndarray
    x: float
    y: float
    gain: float = 1.0
    offset: float = 0.0
    weight: float = 1.0
    mesh: np.ndarray | None = None


def tiles_touching(box: tuple[int, int, int, int], positions: np.ndarray, shapes: Sequence[tuple[int, int]],
                   margins: Sequence[float] | None = None) -> list[int]:
    """Indices of tiles whose footprint (at `positions` (x, y), shapes (h, w), grown by
    `margins` px each: how far a mesh moves the tile's pixels) meets the box (x0, y0, x1, y1):
    pixel centres within its footprint, [x - 0.5, x + w - 0.5)."""
    x0, y0, x1, y1 = box
    out = []
    for i, ((x, y), (h, w)) in enumerate(zip(positions, shapes)):
        m = float(margins[i]) if margins is not None else 0.0
        if (np.ceil(x - 0.5 - m) < x1 and np.ceil(x + w - 0.5 + m) > x0 and np.ceil(y - 0.5 - m) < y1
                and np.ceil(y + h - 0.5 + m) > y0):
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
        # outermost half pixel takes the edge pixel's value); with a mesh, grown by its reach.
        m = int(np.ceil(np.abs(tile.mesh).max())) + 1 if tile.mesh is not None else 0
        cx0, cx1 = max(x0, int(np.ceil(tile.x - 0.5)) - m), min(x1, int(np.ceil(tile.x + w - 0.5)) + m)
        cy0, cy1 = max(y0, int(np.ceil(tile.y - 0.5)) - m), min(y1, int(np.ceil(tile.y + h - 0.5)) + m)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        if tile.mesh is None:
            u = np.arange(cx0, cx1) - tile.x
            v = np.arange(cy0, cy1) - tile.y
            vv, uu = np.meshgrid(v, u, indexing="ij")
            inside = None
        else:
            vv, uu = mesh_coordinates(np.arange(cx0, cx1), np.arange(cy0, cy1), (tile.x, tile.y), (h, w), tile.mesh)
            inside = (vv >= -0.5) & (vv < h - 0.5) & (uu >= -0.5) & (uu < w - 0.5)
            if not inside.any():
                continue
        # Only the part of the tile under the box is resampled.
        ru0, ru1 = max(0, int(np.floor(uu.min()))), min(w, int(np.floor(uu.max())) + 2)
        rv0, rv1 = max(0, int(np.floor(vv.min()))), min(h, int(np.floor(vv.max())) + 2)
        if ru1 <= ru0 or rv1 <= rv0:
            continue
        patch = tile.pixels[rv0:rv1, ru0:ru1]
        coords = [vv - rv0, uu - ru0]
        values = ndimage.map_coordinates(patch.astype(np.float32), coords, order=1, mode="nearest")
        signal = ndimage.map_coordinates(signal_mask(patch).astype(np.float32), coords, order=1, mode="nearest") > 0.999
        weight = _edge_weight(h, w, vv, uu) * tile.weight
        weight = np.where(signal, weight, weight * FALLBACK_WEIGHT)
        if inside is not None:
            weight = np.where(inside, weight, 0.0)
        at = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        total[at] += weight * (tile.gain * values + tile.offset)
        weights[at] += weight
    out = np.divide(total, weights, out=np.zeros_like(total), where=weights > 0)
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(dtype)
