"""Flow fields between two EM sections from patch cross-correlation on a regular grid.

Pure functions over numpy arrays (the SOFIMA idea, our own code). Convention everywhere: a flow
field `F` lives on grid points `p` of the *reference* section (pixel coordinates [y, x]) and says
that the content at `p` in the reference is found at `p + F(p)` in the *moving* section.

Pipeline of `estimate_flow`:
  1. flow at a coarse scale (sections block-averaged by `coarse_factor`), patches centred on a
     prior (the whole-section translation from align.coarse);
  2. flow at full resolution, patches centred on the coarse flow;
  3. outlier rejection: peak sharpness, first/second peak ratio, masks, deviation from the local
     median; coarse vectors fill the holes the fine pass leaves;
  4. refinement: the moving section is warped by the current flow and the (now sub-pixel)
     residual is measured again, so the sub-pixel fit works near zero shift, where its bias
     vanishes (a 3-point fit is exact at 0 and biased by up to ~0.1 px in between).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from exaconnect.errors import InputError


@dataclass(frozen=True)
class FlowConfig:
    """Patch matching parameters. SOFIMA's defaults for ~10 nm EM are 160 px patches every 40 px;
    small test sections (250 px) want smaller patches so that the grid has interior points."""

    patch_size: int = 160
    stride: int = 40
    coarse_factor: int = 2
    # A correlation peak must stand out of its map (peak minus mean, in standard deviations of
    # the map): unrelated or contrast-inverted patches give 2-4, neighbouring FIB-25 sections
    # 5-10 with 64 px patches (more with larger ones).
    min_peak_sharpness: float = 5.0
    # First over second peak (the second searched outside `peak_exclusion` px of the first).
    # SOFIMA uses 1.6 on its own (differently normalised) peaks; repetitive texture fails this.
    min_peak_ratio: float = 1.1
    peak_exclusion: int = 3
    # A vector further than this from the median of its valid 3x3 neighbours is an outlier: the
    # smooth distortions of EM change by much less than a pixel between grid points.
    max_median_deviation: float = 2.0
    # A patch whose reference or moving window is less than this textured is not matched; just
    # under a half, so that grid points on the section edge (half their patch outside) count.
    min_patch_mask_fraction: float = 0.45
    refine_iterations: int = 1

    def __post_init__(self) -> None:
        if self.patch_size < 8 or self.stride < 1:
            raise InputError(f"flow patch_size {self.patch_size} / stride {self.stride}: expected patch >= 8, stride >= 1")
        if self.coarse_factor < 1:
            raise InputError(f"flow coarse_factor {self.coarse_factor}: expected >= 1")


@dataclass(frozen=True)
class FlowField:
    """Flow on grid points `stride * (i, j)` of the reference section, [gy, gx, 2] (dy, dx) px;
    `valid` marks vectors that passed every test (invalid ones hold filled-in values)."""

    flow: np.ndarray
    valid: np.ndarray
    stride: int
    sharpness: np.ndarray
    peak_ratio: np.ndarray

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.mean()) if self.valid.size else 0.0


# ---------------------------------------------------------------- masks and images

def section_mask(section: np.ndarray, min_local_std: float = 2.0, window: int = 5) -> np.ndarray:
    """Pixels worth matching: some local texture, and not the zero fill outside the imaged area.

    Blank sections, fill outside the field of view and folds (flat, dark bands) have almost no
    local variance, so one test catches all three.
    """
    image = section.astype(np.float32)
    mean = ndimage.uniform_filter(image, window)
    var = ndimage.uniform_filter(image * image, window) - mean * mean
    flat = (var <= min_local_std**2) | (image <= 0)
    # Grow the flat regions by the window: the edge of a fold or of the imaged area is itself
    # high-contrast, and matching it would pull patches onto the edge instead of the tissue.
    flat = ndimage.binary_dilation(flat, iterations=window)
    return ~flat


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Block mean by an integer factor (edges cropped)."""
    if factor == 1:
        return image.astype(np.float32)
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    return image[:h, :w].astype(np.float32).reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def grid_shape(section_shape: tuple[int, int], stride: int) -> tuple[int, int]:
    """Grid points at 0, stride, ... covering the section (the last at or past its edge)."""
    return tuple(-(-(s - 1) // stride) + 1 for s in section_shape)  # type: ignore[return-value]


def grid_points(section_shape: tuple[int, int], stride: int) -> np.ndarray:
    gy, gx = grid_shape(section_shape, stride)
    yy, xx = np.meshgrid(np.arange(gy) * stride, np.arange(gx) * stride, indexing="ij")
    return np.stack([yy, xx], axis=-1).astype(np.float64)


# ---------------------------------------------------------------- patch correlation

def extract_patches(image: np.ndarray, mask: np.ndarray, centers: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square patches (and their masks) centred on integer `centers` [n, 2]; outside is masked."""
    half = size // 2
    pad = size + 1
    padded = np.pad(image.astype(np.float32), pad)
    padded_mask = np.pad(mask, pad)
    starts = np.asarray(centers, dtype=np.int64) - half + pad
    starts = np.clip(starts, 0, np.array(padded.shape) - size)
    offsets = np.arange(size)
    rows = starts[:, 0, None, None] + offsets[None, :, None]
    cols = starts[:, 1, None, None] + offsets[None, None, :]
    return padded[rows, cols], padded_mask[rows, cols]


def _normalize(patches: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over each patch's valid pixels; masked pixels become 0 so that
    they add nothing to the correlation (this also makes matching blind to contrast and gain)."""
    m = masks.astype(np.float32)
    count = np.maximum(m.sum(axis=(1, 2), keepdims=True), 1.0)
    mean = (patches * m).sum(axis=(1, 2), keepdims=True) / count
    centred = (patches - mean) * m
    std = np.sqrt((centred**2).sum(axis=(1, 2), keepdims=True) / count)
    return centred / np.maximum(std, 1e-6)


def cross_correlate(ref: np.ndarray, mov: np.ndarray, max_shift: int) -> np.ndarray:
    """Batched cross-correlation C(d) = sum_u ref(u) mov(u + d) for |d| <= max_shift, without
    wrap-around (zero padding by max_shift), centred: index `max_shift` is d = 0.
    Inputs [n, size, size]; single precision halves the FFT time and is ample for a peak."""
    import scipy.fft

    n, size, _ = ref.shape
    length = scipy.fft.next_fast_len(size + max_shift + 1, real=True)
    shape = (length, length)
    fr = scipy.fft.rfft2(ref.astype(np.float32), s=shape)
    fm = scipy.fft.rfft2(mov.astype(np.float32), s=shape)
    corr = scipy.fft.irfft2(np.conj(fr) * fm, s=shape)
    corr = np.roll(corr, (max_shift, max_shift), axis=(1, 2))[:, : 2 * max_shift + 1, : 2 * max_shift + 1]
    return corr / float(size * size)


def _subpixel(c_minus: np.ndarray, c0: np.ndarray, c_plus: np.ndarray) -> np.ndarray:
    """Offset of a peak from three samples: a Gaussian fit where all are positive (correlation
    peaks are close to Gaussian, so it is less biased than a parabola), else a parabola."""
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = (c_minus > 0) & (c0 > 0) & (c_plus > 0)
        lm, l0, lp = (np.log(np.where(positive, v, 1.0)) for v in (c_minus, c0, c_plus))
        gauss = (lm - lp) / (2 * (lm - 2 * l0 + lp))
        parab = (c_minus - c_plus) / (2 * (c_minus - 2 * c0 + c_plus))
        offset = np.where(positive, gauss, parab)
    offset = np.where(np.isfinite(offset), offset, 0.0)
    return np.clip(offset, -0.5, 0.5)


@dataclass(frozen=True)
class Peaks:
    shift: np.ndarray  # [n, 2] sub-pixel (dy, dx)
    sharpness: np.ndarray  # [n]
    ratio: np.ndarray  # [n]


def find_peaks(corr: np.ndarray, max_shift: int, exclusion: int) -> Peaks:
    """Best peak within `max_shift` of zero, its sub-pixel position and quality statistics."""
    n, h, w = corr.shape
    cy, cx = h // 2, w // 2
    window = corr[:, cy - max_shift: cy + max_shift + 1, cx - max_shift: cx + max_shift + 1]
    flat = window.reshape(n, -1)
    best = flat.argmax(axis=1)
    py, px = np.unravel_index(best, window.shape[1:])
    peak = flat[np.arange(n), best]
    mean = flat.mean(axis=1)
    std = flat.std(axis=1)
    sharpness = (peak - mean) / np.maximum(std, 1e-9)
    # Second peak: the maximum outside a small disc around the first.
    yy, xx = np.mgrid[: window.shape[1], : window.shape[2]]
    near = (np.abs(yy[None] - py[:, None, None]) <= exclusion) & (np.abs(xx[None] - px[:, None, None]) <= exclusion)
    second = np.where(near, -np.inf, window).reshape(n, -1).max(axis=1)
    ratio = np.where(second > 0, peak / np.maximum(second, 1e-9), np.where(peak > 0, np.inf, 0.0))
    # Sub-pixel refinement on the full map (the neighbours of a peak on the window's edge exist there).
    gy, gx = py + cy - max_shift, px + cx - max_shift
    idx = np.arange(n)
    ymin, ymax = np.clip(gy - 1, 0, h - 1), np.clip(gy + 1, 0, h - 1)
    xmin, xmax = np.clip(gx - 1, 0, w - 1), np.clip(gx + 1, 0, w - 1)
    dy = _subpixel(corr[idx, ymin, gx], corr[idx, gy, gx], corr[idx, ymax, gx])
    dx = _subpixel(corr[idx, gy, xmin], corr[idx, gy, gx], corr[idx, gy, xmax])
    shift = np.stack([gy - cy + dy, gx - cx + dx], axis=1).astype(np.float64)
    return Peaks(shift, sharpness, ratio)


def match_patches(ref: np.ndarray, ref_mask: np.ndarray, mov: np.ndarray, mov_mask: np.ndarray,
                  points: np.ndarray, prior: np.ndarray, config: FlowConfig) -> tuple[np.ndarray, np.ndarray, Peaks]:
    """Flow at `points` [n, 2] (reference pixels), searching around `prior` [n, 2].

    Returns (flow [n, 2], usable [n], peaks); `usable` combines the mask and peak tests.
    """
    size = config.patch_size
    centers = np.round(points).astype(np.int64)
    offset = np.round(prior).astype(np.int64)
    a, ma = extract_patches(ref, ref_mask, centers, size)
    b, mb = extract_patches(mov, mov_mask, centers + offset, size)
    frac_a = ma.mean(axis=(1, 2))
    frac_b = mb.mean(axis=(1, 2))
    # The prior centres the moving patch, so the residual shift is small; half a patch of search
    # range still catches a prior that is off by a membrane spacing.
    max_shift = size // 2
    corr = cross_correlate(_normalize(a, ma), _normalize(b, mb), max_shift)
    peaks = find_peaks(corr, max_shift=max_shift - 1, exclusion=config.peak_exclusion)
    flow = offset + peaks.shift + (centers - points)
    usable = (
        (frac_a >= config.min_patch_mask_fraction)
        & (frac_b >= config.min_patch_mask_fraction)
        & (peaks.sharpness >= config.min_peak_sharpness)
        & (peaks.ratio >= config.min_peak_ratio)
    )
    return flow, usable, peaks


# ---------------------------------------------------------------- field operations

def median_outliers(flow: np.ndarray, valid: np.ndarray, max_deviation: float) -> np.ndarray:
    """Valid vectors that agree with the median of their valid 3x3 neighbourhood (itself
    included); an isolated vector with no valid neighbour is kept only if it is alone."""
    gy, gx, _ = flow.shape
    padded = np.full((gy + 2, gx + 2, 2), np.nan)
    padded[1:-1, 1:-1] = np.where(valid[..., None], flow, np.nan)
    stack = np.stack([padded[dy: dy + gy, dx: dx + gx] for dy in range(3) for dx in range(3)], axis=0)
    count = np.isfinite(stack[..., 0]).sum(axis=0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(stack, axis=0)
    deviation = np.linalg.norm(flow - median, axis=-1)
    keep = valid & (count >= 2) & (deviation <= max_deviation)
    return keep


def fill_invalid(flow: np.ndarray, valid: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """Invalid vectors take the nearest valid vector (a prior for the next pass; the mesh, not
    this, decides the final shape), or `fallback` where there is no valid vector at all."""
    if valid.all():
        return flow.copy()
    if not valid.any():
        return np.zeros_like(flow) if fallback is None else np.broadcast_to(fallback, flow.shape).copy()
    _, (iy, ix) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return flow[iy, ix]


def dense_field(grid_values: np.ndarray, stride: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of a [gy, gx, 2] grid (points at stride*(i, j)) to every pixel."""
    yy, xx = np.meshgrid(np.arange(shape[0]) / stride, np.arange(shape[1]) / stride, indexing="ij")
    return np.stack(
        [ndimage.map_coordinates(grid_values[..., c], [yy, xx], order=1, mode="nearest") for c in range(2)], axis=-1
    )


def sample_field(grid_values: np.ndarray, stride: int, points: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a [gy, gx, C] grid at arbitrary pixel `points` [..., 2]."""
    coords = [points[..., 0] / stride, points[..., 1] / stride]
    return np.stack(
        [ndimage.map_coordinates(grid_values[..., c], coords, order=1, mode="nearest") for c in range(grid_values.shape[-1])],
        axis=-1,
    )


def warp_by_flow(mov: np.ndarray, dense_flow: np.ndarray, order: int = 3) -> np.ndarray:
    """The moving section resampled into the reference frame: out(x) = mov(x + F(x)); 0 outside."""
    yy, xx = np.meshgrid(np.arange(mov.shape[0]), np.arange(mov.shape[1]), indexing="ij")
    coords = [yy + dense_flow[..., 0], xx + dense_flow[..., 1]]
    return ndimage.map_coordinates(mov.astype(np.float32), coords, order=order, mode="constant", cval=0.0)


# ---------------------------------------------------------------- the whole estimate

def _pass(ref, ref_mask, mov, mov_mask, points, prior, config) -> tuple[np.ndarray, np.ndarray, Peaks]:
    shape = points.shape[:2]
    flow, usable, peaks = match_patches(ref, ref_mask, mov, mov_mask, points.reshape(-1, 2), prior.reshape(-1, 2), config)
    return flow.reshape(*shape, 2), usable.reshape(shape), peaks


def estimate_flow(ref: np.ndarray, mov: np.ndarray, prior_shift: tuple[float, float] = (0.0, 0.0),
                  config: FlowConfig = FlowConfig(), ref_mask: np.ndarray | None = None,
                  mov_mask: np.ndarray | None = None) -> FlowField:
    """Two-scale flow from `ref` to `mov` (2-D arrays of the same shape) around `prior_shift`."""
    if ref.shape != mov.shape or ref.ndim != 2:
        raise InputError(f"flow: sections of shapes {ref.shape} and {mov.shape}; expected two equal 2-D arrays")
    ref_mask = section_mask(ref) if ref_mask is None else ref_mask
    mov_mask = section_mask(mov) if mov_mask is None else mov_mask
    points = grid_points(ref.shape, config.stride)
    prior = np.broadcast_to(np.asarray(prior_shift, dtype=np.float64), points.shape)

    # Coarse scale: the same grid points, patches of the same pixel count on block-averaged
    # sections, so each covers `coarse_factor` times the area and bridges texture-poor spots.
    f = config.coarse_factor
    if f > 1:
        rc, mc = downsample(ref, f), downsample(mov, f)
        rmc = downsample(ref_mask, f) > 0.5
        mmc = downsample(mov_mask, f) > 0.5
        coarse, coarse_ok, _ = _pass(rc, rmc, mc, mmc, points / f, prior / f, config)
        coarse = coarse * f
        coarse_ok = median_outliers(coarse, coarse_ok, config.max_median_deviation * f)
        prior = fill_invalid(coarse, coarse_ok, fallback=np.asarray(prior_shift, dtype=np.float64))
    else:
        coarse, coarse_ok = prior.copy(), np.zeros(points.shape[:2], bool)

    flow, ok, peaks = _pass(ref, ref_mask, mov, mov_mask, points, prior, config)
    ok = median_outliers(flow, ok, config.max_median_deviation)
    for _ in range(config.refine_iterations):
        if not ok.any():
            break
        current = fill_invalid(flow, ok)
        dense = dense_field(current, config.stride, ref.shape)
        warped = warp_by_flow(mov, dense)
        warped_mask = warp_by_flow(mov_mask.astype(np.float32), dense, order=1) > 0.99
        residual, ok2, peaks = _pass(ref, ref_mask, warped, warped_mask, points, np.zeros_like(points), config)
        flow = current + residual
        ok = median_outliers(flow, ok2 & ok, config.max_median_deviation)

    # Coarse vectors fill holes of the fine field where they agree with its surroundings.
    holes = ~ok & coarse_ok
    merged_ok = ok | holes
    merged = np.where(ok[..., None], flow, coarse)
    merged_ok = median_outliers(merged, merged_ok, config.max_median_deviation) | ok
    merged = fill_invalid(merged, merged_ok, fallback=np.asarray(prior_shift, dtype=np.float64))
    shape = points.shape[:2]
    return FlowField(merged, merged_ok, config.stride, peaks.sharpness.reshape(shape), peaks.ratio.reshape(shape))
