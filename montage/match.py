"""Pairwise offsets of overlapping neighbour tiles by masked normalised cross-correlation.

For a pair (a, b) whose stage positions say b sits at `d` from a, the true offset is searched in
d ± R (R = max(search_px, search_fraction x tile side)). Each candidate offset is scored by the
Pearson correlation of the two tiles over the pixels they share at that offset, leaving out
pixels that carry no signal (at the dtype's floor or ceiling: saturated or empty). All
candidates are computed at once with FFTs (Padfield's masked NCC, IEEE TIP 2012): the sums over
the shared pixels are six cross-correlations of the images, their squares and their masks.

A pair is trusted only when the peak is high, unambiguous, inside the search window and backed
by enough shared pixels with texture; otherwise it is reported with the reason and not used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from exaconnect.errors import InputError


@dataclass(frozen=True)
class MatchConfig:
    """`search_px`, `search_fraction`: the search radius is the larger of the two (px, fraction of
    the tile's smaller side). A peak is trusted when its correlation is at least
    `min_correlation`, the best other peak (further than `peak_exclusion_px`) is at most
    `max_second_ratio` of it, its significance is at least `min_significance`, the shared area at the peak is at least `min_overlap_fraction` of
    the largest shared area in the window (and `min_overlap_pixels`), and both sides of the
    overlap vary by at least `min_std_fraction` of the dtype's range."""

    search_px: int = 50
    search_fraction: float = 0.1
    min_correlation: float = 0.5
    max_second_ratio: float = 0.9
    # correlation x sqrt(shared pixels / 25): about the peak's height in standard deviations of
    # chance correlation, counting 5 x 5 px of EM texture as one independent sample. On FIB-25
    # tiles (tests/montage/test_montage_kernels.py) true peaks score >= 3.7 and 99% of false ones < 5.
    min_significance: float = 5.0
    peak_exclusion_px: int = 4
    min_overlap_fraction: float = 0.2
    min_overlap_pixels: int = 256
    min_std_fraction: float = 0.004
    # Neighbours: side by side along one axis (sharing at least this fraction of the other).
    min_shared_side: float = 0.3

    def __post_init__(self) -> None:
        if self.search_px < 1:
            raise InputError(f"montage search_px {self.search_px}: expected >= 1")
        for name in ("search_fraction", "min_correlation", "max_second_ratio", "min_overlap_fraction",
                     "min_std_fraction", "min_shared_side"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"montage {name} {getattr(self, name)}: expected a fraction in [0, 1]")

    def radius(self, shape: Sequence[int]) -> int:
        return int(max(self.search_px, np.ceil(self.search_fraction * min(shape))))


@dataclass
class PairMatch:
    """The measured offset of tile b's top-left relative to tile a's (x, y), or None when the pair
    could not be measured; `trusted` pairs go into the solve. Intensity statistics of the shared
    pixels at the measured offset feed the gain/offset correction."""

    a: int
    b: int
    nominal: tuple[float, float]
    offset: tuple[float, float] | None
    correlation: float
    second: float
    overlap_pixels: int
    trusted: bool
    reason: str
    mean_a: float = float("nan")
    std_a: float = float("nan")
    mean_b: float = float("nan")
    std_b: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PairMatch":
        data = dict(data)
        for key in ("nominal", "offset"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def neighbour_pairs(positions: np.ndarray, shapes: Sequence[tuple[int, int]], config: MatchConfig) -> list[tuple[int, int]]:
    """Pairs (i < j) of tiles side by side at their stage positions (x, y): sharing at least
    `min_shared_side` of one axis and overlapping (or apart by less than the search radius)
    along the other. Corner-only (diagonal) neighbours share too little to measure reliably."""
    pairs = []
    for i in range(len(positions)):
        for j in range(i + 1, len(positions)):
            (xi, yi), (xj, yj) = positions[i], positions[j]
            (hi, wi), (hj, wj) = shapes[i], shapes[j]
            shared_x = min(xi + wi, xj + wj) - max(xi, xj)
            shared_y = min(yi + hi, yj + hj) - max(yi, yj)
            radius = config.radius((min(hi, hj), min(wi, wj)))
            side = config.min_shared_side
            if min(shared_x, shared_y) <= -radius:
                continue
            if shared_y >= side * min(hi, hj) or shared_x >= side * min(wi, wj):
                pairs.append((i, j))
    return pairs


def signal_mask(tile: np.ndarray) -> np.ndarray:
    """Pixels that carry signal: not at the dtype's floor or ceiling (empty or saturated)."""
    if tile.dtype.kind in "ui":
        return (tile > 0) & (tile < np.iinfo(tile.dtype).max)
    return np.isfinite(tile)


def tile_content(tile: np.ndarray, config: MatchConfig) -> dict:
    """What a tile holds: the fraction of pixels with signal, their spread, and a status:
    "ok", "no signal" (mostly empty or saturated) or "blank" (flat: no texture to match)."""
    mask = signal_mask(tile)
    fraction = float(mask.mean())
    spread = float(tile[mask].std()) if mask.any() else 0.0
    top = float(np.iinfo(tile.dtype).max) if tile.dtype.kind in "ui" else 1.0
    if fraction < 0.5:
        status = "no signal"
    elif spread < config.min_std_fraction * top:
        status = "blank"
    else:
        status = "ok"
    return {"status": status, "signal_fraction": fraction, "std": spread, "mean": float(tile.mean())}


def _overlap_slices(shift: tuple[int, int], shape_a: tuple[int, int], shape_b: tuple[int, int]):
    """Slices of a and of b that coincide when b's pixel (0, 0) sits at a's pixel `shift` (y, x)."""
    out_a, out_b = [], []
    for s, na, nb in zip(shift, shape_a, shape_b):
        lo, hi = max(0, s), min(na, s + nb)
        if hi <= lo:
            return None
        out_a.append(slice(lo, hi))
        out_b.append(slice(lo - s, hi - s))
    return tuple(out_a), tuple(out_b)


def masked_ncc(fixed: np.ndarray, fixed_mask: np.ndarray, moving: np.ndarray, moving_mask: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Correlation and shared-pixel count for every shift of `moving` against `fixed`.

    Index (i, j) of the outputs is the shift (sy, sx) = (i - (hm - 1), j - (wm - 1)): moving's
    pixel (0, 0) lies on fixed's pixel (sy, sx). Pixels outside either mask take no part."""
    hf, wf = fixed.shape
    hm, wm = moving.shape
    shape = (sfft.next_fast_len(hf + hm - 1, real=True), sfft.next_fast_len(wf + wm - 1, real=True))
    # Centred values keep the sums of squares small, so the differences below do not cancel.
    f = np.where(fixed_mask, fixed - fixed[fixed_mask].mean(), 0.0) if fixed_mask.any() else np.zeros(fixed.shape)
    m = np.where(moving_mask, moving - moving[moving_mask].mean(), 0.0) if moving_mask.any() else np.zeros(moving.shape)

    def spectrum(x):
        return sfft.rfft2(x, shape)

    def correlate(a, b):
        full = sfft.irfft2(a * b, shape)
        # Negative shifts wrapped round to the end: roll them to the front.
        return np.roll(full, (hm - 1, wm - 1), axis=(0, 1))[: hf + hm - 1, : wf + wm - 1]

    # Correlation with the moving image = product with the conjugate of its spectrum.
    F, M = spectrum(f), np.conj(spectrum(m))
    sum_fm = correlate(F, M)
    if _scattered(fixed_mask) and _scattered(moving_mask):
        # Nothing, or only scattered pixels, masked out (most pairs: a few saturated or empty
        # pixels of noise): those take the crop's mean (0 after centring), which pulls no shift,
        # and every overlap is a rectangle of each tile, so the pixel counts and the sums over
        # it come from summed-area tables (Lewis's fast NCC) instead of five more correlations:
        # three FFTs per pair instead of twelve. Blank or saturated regions take the masked path.
        count, sum_f, sum_ff = _overlap_sums(f, hm, wm, moving_side=False)
        _, sum_m, sum_mm = _overlap_sums(m, hf, wf, moving_side=True)
    else:
        fm, mm = fixed_mask.astype(np.float64), moving_mask.astype(np.float64)
        F2, FM = spectrum(f * f), spectrum(fm)
        M2, MM = np.conj(spectrum(m * m)), np.conj(spectrum(mm))
        count = np.rint(correlate(FM, MM))
        sum_f, sum_m = correlate(F, MM), correlate(FM, M)
        sum_ff, sum_mm = correlate(F2, MM), correlate(FM, M2)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.maximum(count, 1)
        covariance = sum_fm - sum_f * sum_m / n
        var_f = np.maximum(sum_ff - sum_f ** 2 / n, 0)
        var_m = np.maximum(sum_mm - sum_m ** 2 / n, 0)
        denominator = np.sqrt(var_f * var_m)
        ncc = np.where((count > 0) & (denominator > 1e-9 * n), covariance / denominator, 0.0)
    return np.clip(ncc, -1, 1), count.astype(np.int64)


# Masks with at most this fraction of their pixels out are treated as full (see masked_ncc).
SCATTERED_MASKED_FRACTION = 0.005


def _scattered(mask: np.ndarray) -> bool:
    return mask.size - np.count_nonzero(mask) <= SCATTERED_MASKED_FRACTION * mask.size


def _overlap_sums(values: np.ndarray, other_h: int, other_w: int, moving_side: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every shift of `masked_ncc` (unmasked tiles): the overlap's pixel count and the sum and
    sum of squares of `values` over the part of its own tile inside the overlap. `values` is the
    fixed crop (`moving_side` False; the other is h x w of the moving crop) or the moving one."""
    h, w = values.shape

    def table(x: np.ndarray) -> np.ndarray:
        out = np.zeros((h + 1, w + 1))
        out[1:, 1:] = x.cumsum(0).cumsum(1)
        return out

    def spans(own: int, other: int) -> tuple[np.ndarray, np.ndarray]:
        # Shift s = index - (moving length - 1) puts moving's 0 on fixed's s.
        if moving_side:  # own = moving length, other = fixed length
            shift = np.arange(other + own - 1) - (own - 1)
            return np.clip(-shift, 0, own), np.clip(other - shift, 0, own)
        shift = np.arange(own + other - 1) - (other - 1)
        return np.clip(shift, 0, own), np.clip(shift + other, 0, own)

    r0, r1 = spans(h, other_h)
    c0, c1 = spans(w, other_w)

    def box(t: np.ndarray) -> np.ndarray:
        rows = t[r1] - t[r0]  # row spans first: two column gathers of the output's size, not four
        return rows[:, c1] - rows[:, c0]

    count = np.outer(r1 - r0, c1 - c0).astype(np.float64)
    return count, box(table(values)), box(table(values * values))


def _subpixel(values: np.ndarray, i: int, j: int, valid: np.ndarray) -> tuple[float, float]:
    """Vertex of a parabola through the peak and its two neighbours, per axis."""
    out = []
    for axis, (k, size) in enumerate(((i, values.shape[0]), (j, values.shape[1]))):
        if 0 < k < size - 1:
            lo = (i - 1, j) if axis == 0 else (i, j - 1)
            hi = (i + 1, j) if axis == 0 else (i, j + 1)
            if valid[lo] and valid[hi]:
                a, b, c = values[lo], values[i, j], values[hi]
                curvature = a - 2 * b + c
                if curvature < 0:
                    out.append(float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5)))
                    continue
        out.append(0.0)
    return out[0], out[1]


def match_pair(tile_a: np.ndarray, tile_b: np.ndarray, nominal: tuple[float, float], config: MatchConfig,
               a: int = 0, b: int = 0) -> PairMatch:
    """Offset (x, y) of b's top-left relative to a's, searched around `nominal` (see module doc)."""
    ha, wa = tile_a.shape
    hb, wb = tile_b.shape
    radius = config.radius((min(ha, hb), min(wa, wb)))
    dx, dy = int(round(nominal[0])), int(round(nominal[1]))
    # Only the parts of each tile that can overlap the other for some offset in the window.
    ay0, ay1 = max(0, dy - radius), min(ha, dy + radius + hb)
    ax0, ax1 = max(0, dx - radius), min(wa, dx + radius + wb)
    by0, by1 = max(0, -dy - radius), min(hb, ha - dy + radius)
    bx0, bx1 = max(0, -dx - radius), min(wb, wa - dx + radius)
    result = PairMatch(a, b, (float(nominal[0]), float(nominal[1])), None, float("nan"), float("nan"), 0, False, "")
    if ay1 <= ay0 or ax1 <= ax0 or by1 <= by0 or bx1 <= bx0:
        result.reason = "no overlap within the search range"
        return result
    fixed = tile_a[ay0:ay1, ax0:ax1].astype(np.float64)
    moving = tile_b[by0:by1, bx0:bx1].astype(np.float64)
    fixed_mask, moving_mask = signal_mask(tile_a[ay0:ay1, ax0:ax1]), signal_mask(tile_b[by0:by1, bx0:bx1])
    top = float(np.iinfo(tile_a.dtype).max) if tile_a.dtype.kind in "ui" else 1.0
    min_std = config.min_std_fraction * top
    for name, values, mask in (("a", fixed, fixed_mask), ("b", moving, moving_mask)):
        if mask.sum() < config.min_overlap_pixels:
            result.reason = f"tile {name} has no usable pixels where the tiles can overlap (blank or saturated)"
            return result
        if values[mask].std() < min_std:
            result.reason = f"low texture: tile {name} varies by {values[mask].std():.2f} < {min_std:.2f} where the tiles can overlap"
            return result
    ncc, count = masked_ncc(fixed, fixed_mask, moving, moving_mask)
    # Index -> tile offset: crop shift s = t + (by, bx) - (ay, ax), index = s + (len(moving) - 1).
    base_y, base_x = by0 - ay0 + moving.shape[0] - 1, bx0 - ax0 + moving.shape[1] - 1
    iy0, iy1 = dy - radius + base_y, dy + radius + base_y + 1
    ix0, ix1 = dx - radius + base_x, dx + radius + base_x + 1
    window = np.zeros(ncc.shape, bool)
    window[max(0, iy0): max(0, iy1), max(0, ix0): max(0, ix1)] = True
    enough = window & (count >= max(config.min_overlap_pixels, config.min_overlap_fraction * count[window].max()))
    if not enough.any():
        result.reason = "too few shared pixels anywhere in the search window"
        return result
    scores = np.where(enough, ncc, -np.inf)
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    best = float(scores[i, j])
    # The runner-up is the best other local maximum: the shoulder of a broad true peak is not one.
    r = config.peak_exclusion_px
    peaks = enough & (scores >= ndimage.maximum_filter(scores, size=3, mode="nearest"))
    peaks[max(0, i - r): i + r + 1, max(0, j - r): j + r + 1] = False
    second = float(scores[peaks].max()) if peaks.any() else -1.0
    sy, sx = _subpixel(scores, i, j, enough)
    offset_x, offset_y = j - base_x + sx, i - base_y + sy
    result.offset = (float(offset_x), float(offset_y))
    result.correlation, result.second, result.overlap_pixels = best, second, int(count[i, j])
    at_edge = i in (iy0, iy1 - 1) or j in (ix0, ix1 - 1) or not enough[max(0, i - 1): i + 2, max(0, j - 1): j + 2].all()
    if best < config.min_correlation:
        result.reason = f"weak peak: correlation {best:.2f} < {config.min_correlation}"
    elif best * np.sqrt(count[i, j] / 25.0) < config.min_significance:
        result.reason = (f"insignificant peak: correlation {best:.2f} over only {int(count[i, j])} shared pixels "
                         f"(significance {best * np.sqrt(count[i, j] / 25.0):.1f} < {config.min_significance})")
    elif second > config.max_second_ratio * best:
        result.reason = f"ambiguous: second peak {second:.2f} vs best {best:.2f}"
    elif at_edge:
        result.reason = "peak on the edge of the search window (offset may be beyond the search range)"
    else:
        result.trusted, result.reason = True, "ok"
    shared = _overlap_slices((int(round(offset_y)), int(round(offset_x))), tile_a.shape, tile_b.shape)
    if shared is not None:
        va, vb = tile_a[shared[0]].astype(np.float64), tile_b[shared[1]].astype(np.float64)
        both = signal_mask(tile_a[shared[0]]) & signal_mask(tile_b[shared[1]])
        if both.sum() >= config.min_overlap_pixels:
            result.mean_a, result.std_a = float(va[both].mean()), float(va[both].std())
            result.mean_b, result.std_b = float(vb[both].mean()), float(vb[both].std())
    return result


def match_section(positions: np.ndarray, shapes: Sequence[tuple[int, int]], read: Callable[[int], np.ndarray],
                  config: MatchConfig, cache_tiles: int = 16, progress: Callable | None = None) -> list[PairMatch]:
    """Every neighbour pair of one section. `read(i)` gives tile i's pixels; at most
    `cache_tiles` tiles are held at once (pairs go in order of their first tile, so a tile is
    read about once for a row-major layout with fewer than `cache_tiles` tiles per row)."""
    from collections import OrderedDict

    cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def tile(i: int) -> np.ndarray:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        cache[i] = read(i)
        while len(cache) > max(2, cache_tiles):
            cache.popitem(last=False)
        return cache[i]

    pairs = neighbour_pairs(positions, shapes, config)
    out = []
    for i, j in pairs if progress is None else progress(pairs):
        nominal = (positions[j][0] - positions[i][0], positions[j][1] - positions[i][1])
        out.append(match_pair(tile(i), tile(j), nominal, config, i, j))
    return out
