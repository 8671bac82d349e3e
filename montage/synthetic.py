"""Tile sets with a known answer: a whole section cut into a grid of overlapping tiles whose
recorded stage positions are wrong by a known amount, optionally with per-tile gain/offset,
noise and a mild affine + lens distortion, as a microscope delivers them. Tests and the demo
stitch them back and compare with the section they came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class TileCut:
    """How to cut a section: `tile_shape` (h, w), `overlap` (px between neighbours), the
    error of the recorded stage positions (uniform in ±`stage_error_px`, both axes), and the
    per-tile imaging changes (gain in 1±`gain`, offset in ±`offset` grey levels, Gaussian noise
    of `noise` grey levels, affine of up to `affine` (dimensionless, e.g. 0.002) and radial
    lens distortion moving the tile corners by up to `lens_px`)."""

    tile_shape: tuple[int, int] = (100, 100)
    overlap: int = 25
    stage_error_px: float = 0.0
    gain: float = 0.0
    offset: float = 0.0
    noise: float = 0.0
    affine: float = 0.0
    lens_px: float = 0.0
    seed: int = 0


@dataclass
class CutTiles:
    """The tiles (row-major), their true top-left positions and the recorded (stage) ones, in the
    section's pixel frame shifted by `origin` (x, y)."""

    tiles: list[np.ndarray]
    true_xy: np.ndarray
    stage_xy: np.ndarray
    grid: tuple[int, int]
    gains: np.ndarray = field(default_factory=lambda: np.zeros(0))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0))


def grid_for(section_shape: tuple[int, int], cut: TileCut) -> tuple[int, int]:
    """Rows and columns of tiles that cover the section (the last row/column flush with its edge)."""
    (height, width), (th, tw) = section_shape, cut.tile_shape
    rows = max(1, int(np.ceil((height - cut.overlap) / (th - cut.overlap))))
    cols = max(1, int(np.ceil((width - cut.overlap) / (tw - cut.overlap))))
    return rows, cols


def _distort(tile: np.ndarray, matrix: np.ndarray, lens: float) -> np.ndarray:
    """Resample `tile` through a small affine about its centre plus a radial (barrel) term that
    moves the corners by `lens` px: the coordinates of output pixel p are read at
    c + A (p - c) + lens * r^2/r_max^2 * (p - c)/r_max."""
    h, w = tile.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    dy, dx = yy - cy, xx - cx
    r_max = np.hypot(cy, cx)
    radial = lens * (dy ** 2 + dx ** 2) / r_max ** 3
    sy = cy + matrix[0, 0] * dy + matrix[0, 1] * dx + radial * dy
    sx = cx + matrix[1, 0] * dy + matrix[1, 1] * dx + radial * dx
    return ndimage.map_coordinates(tile.astype(np.float64), [sy, sx], order=3, mode="reflect")


def cut_tiles(section: np.ndarray, cut: TileCut, origin: tuple[float, float] = (0.0, 0.0)) -> CutTiles:
    """Cut `section` ([y, x], uint8/uint16) into overlapping tiles (see `TileCut`)."""
    rng = np.random.default_rng(cut.seed)
    height, width = section.shape
    th, tw = cut.tile_shape
    if th > height or tw > width or cut.overlap >= min(th, tw):
        raise ValueError(f"tile shape {cut.tile_shape} with overlap {cut.overlap} does not fit a {section.shape} section")
    rows, cols = grid_for(section.shape, cut)
    ys = np.minimum(np.arange(rows) * (th - cut.overlap), height - th)
    xs = np.minimum(np.arange(cols) * (tw - cut.overlap), width - tw)
    top = np.iinfo(section.dtype).max
    tiles, true_xy, gains, offsets = [], [], [], []
    for y in ys:
        for x in xs:
            tile = section[y: y + th, x: x + tw].astype(np.float64)
            if cut.affine or cut.lens_px:
                matrix = np.eye(2) + rng.uniform(-cut.affine, cut.affine, (2, 2))
                tile = _distort(tile, matrix, rng.uniform(0, cut.lens_px))
            gain = 1 + rng.uniform(-cut.gain, cut.gain)
            offset = rng.uniform(-cut.offset, cut.offset)
            tile = tile * gain + offset
            if cut.noise:
                tile = tile + rng.normal(0, cut.noise, tile.shape)
            tiles.append(np.clip(np.rint(tile), 0, top).astype(section.dtype))
            true_xy.append((x + origin[0], y + origin[1]))
            gains.append(gain)
            offsets.append(offset)
    true_xy = np.array(true_xy, dtype=np.float64)
    error = rng.uniform(-cut.stage_error_px, cut.stage_error_px, true_xy.shape)
    # Zero-mean errors: a solve anchored on the stage positions then lands on the truth itself.
    error -= error.mean(axis=0)
    return CutTiles(tiles, true_xy, np.round(true_xy + error, 1), (rows, cols), np.array(gains), np.array(offsets))
