"""Flow fields between two EM sections from patch cross-correlation on a regular grid.

Pure functions over numpy arrays (the SOFIMA idea, our own code). Convention everywhere: a flow
field `F` lives on grid points `p` of the *reference* section (pixel coordinates [y, x]) and says
that the content at `p` in the reference is found at `p + F(p)` in the *moving* section.

Pipeline of `estimate_flow` (docs/align.md has the measurements behind each choice):
  0. each section is prepared once (`prepare_section`): texture mask, a high-pass (the image minus
     a Gaussian blur of `highpass_sigma` px) and its block-averaged copy for the coarse pass. The
     high-pass removes the broad, smooth part of EM contrast (cell interiors, vignetting) that
     makes raw correlation peaks wide; a narrow peak is what a 3-point sub-pixel fit needs.
  1. coarse pass: block-averaged sections, patches on a grid `coarse_stride_factor` times sparser,
     moving patches centred on the prior (the whole-section translation from align.coarse);
     robust vectors become a smooth prior field;
  2. fine pass: the moving section is warped by that prior (cubic spline) into the reference's
     frame, so each fine patch pair differs by a small residual shift only, without the rotation
     and shear the prior already explains. Sub-pixel fits are least biased near zero shift, and a
     patch no longer averages a displacement that varies across it;
  3. outlier rejection: peak sharpness, first/second peak ratio, masks, residual size and
     deviation from the local median.
Correlations are circular over a Tukey-windowed patch (no zero padding: a patch costs one FFT of
its own size), batched over all patches of a section, float32, `scipy.fft` with `workers`.
The reference's prepared data and its patch transforms are cached on its `PreparedSection`, so a
section that is the reference of several attempts (skips, the inverted retry) pays once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import scipy.fft
from scipy import ndimage

from exaconnect.errors import InputError
from exaconnect.precomputed.config_loader import load_dataclass


@dataclass(frozen=True)
class FlowConfig:
    """Patch matching parameters. SOFIMA's defaults for ~10 nm EM are 160 px patches every 40 px;
    small test sections (250 px) want smaller patches so that the grid has interior points."""

    patch_size: int = 160
    stride: int = 40
    # Resolution of the coarse pass (block mean) and its grid spacing in units of `stride`.
    coarse_factor: int = 2
    coarse_stride_factor: int = 2
    # Patch size of the coarse pass, in block-averaged px; 0: patch_size / coarse_factor, the
    # fine patches' footprint (on FIB-25 warps, 32 px at half resolution gave a better prior than
    # 64: 0.12 against 0.13 px median flow error after the fine pass, at a quarter of the cost).
    coarse_patch_size: int = 0
    # Gaussian sigma (px) of the high-pass applied before matching; 0 switches it off. 8 px at
    # 10 nm: membranes (2-5 px) pass, cell interiors and shading do not.
    highpass_sigma: float = 8.0
    # Fraction of each patch side tapered by the Tukey window (kills wrap-around edges).
    taper: float = 0.2
    # A correlation peak must stand out of its search window (peak minus mean, in standard
    # deviations): unrelated or contrast-inverted FIB-25 patches give 0.5-2.5, neighbours 3.7-5.5
    # (10th-90th percentile, 64 px high-passed patches).
    min_peak_sharpness: float = 3.0
    # ... and reach this correlation coefficient: neighbours 0.76-0.91, sections two apart
    # 0.62-0.88, unrelated or inverted 0.15-0.29.
    min_peak_correlation: float = 0.4
    # First over second peak (the second searched outside `peak_exclusion` px of the first).
    min_peak_ratio: float = 1.1
    peak_exclusion: int = 3
    # A vector further than this from the median of its valid 3x3 neighbours is an outlier: the
    # smooth distortions of EM change by much less than a pixel between grid points.
    max_median_deviation: float = 1.5
    # A patch whose reference or moving window is less than this textured is not matched; just
    # under a half, so that grid points on the section edge (half their patch outside) count.
    min_patch_mask_fraction: float = 0.45
    # Fine passes after the coarse one (each warps the moving section by the current field).
    refine_iterations: int = 1
    # A fine residual beyond this (px) means the prior was wrong there: the vector is dropped.
    max_residual: float = 4.0
    # Sections larger than this (px, either side) are matched tile by tile (`estimate_flow_tiled`);
    # 0: never.
    tile_size: int = 4096
    # Threads for scipy.fft (1 inside queue workers, which are one process per core).
    workers: int = 1

    def __post_init__(self) -> None:
        if self.patch_size < 8 or self.stride < 1:
            raise InputError(f"flow.patch_size {self.patch_size} / flow.stride {self.stride}: expected patch >= 8, stride >= 1")
        if self.coarse_factor < 1 or self.coarse_stride_factor < 1:
            raise InputError(f"flow.coarse_factor {self.coarse_factor} / flow.coarse_stride_factor "
                             f"{self.coarse_stride_factor}: expected >= 1")
        if self.coarse_patch_size and self.coarse_patch_size < 8:
            raise InputError(f"flow.coarse_patch_size {self.coarse_patch_size}: expected 0 (= patch_size) or >= 8")
        if self.highpass_sigma < 0:
            raise InputError(f"flow.highpass_sigma {self.highpass_sigma}: expected >= 0 (0 switches it off)")
        if not 0 <= self.taper <= 0.5:
            raise InputError(f"flow.taper {self.taper}: expected a fraction in [0, 0.5]")
        if self.refine_iterations < 1:
            raise InputError(f"flow.refine_iterations {self.refine_iterations}: expected >= 1")
        if self.max_residual <= 0 or self.max_median_deviation <= 0:
            raise InputError(f"flow.max_residual {self.max_residual} / flow.max_median_deviation "
                             f"{self.max_median_deviation}: expected > 0")
        if self.tile_size and self.tile_size < 4 * self.patch_size:
            raise InputError(f"flow.tile_size {self.tile_size}: expected 0 (no tiles) or >= 4 x flow.patch_size")
        if self.workers < 1:
            raise InputError(f"flow.workers {self.workers}: expected >= 1")

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FlowConfig":
        return load_dataclass(cls, data, "align.flow")


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


def _box3(image: np.ndarray, width: int) -> np.ndarray:
    """Three passes of a box filter per axis: a Gaussian of sigma sqrt(width^2 - 1) / 2 to within a
    few per cent, at a cost independent of the width; zero beyond the image."""
    out = image
    for _ in range(3):
        out = ndimage.uniform_filter(out, width, mode="constant")
    return out


def highpass(image: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Image minus its masked blur (normalised convolution, so the zero fill outside the imaged
    area does not leak a dark halo into the tissue next to it); 0 outside the mask. The blur is a
    triple box filter of the Gaussian's sigma: shift-invariant like the Gaussian (a blur computed
    on block means and interpolated back would not be, and both sections must be filtered alike
    wherever their content lies) and independent of sigma in cost."""
    image = image.astype(np.float32)
    m = mask.astype(np.float32)
    if sigma <= 0:
        mean = float((image * m).sum() / max(m.sum(), 1.0))
        return np.where(mask, image - mean, 0.0).astype(np.float32)
    width = max(1, int(round(np.sqrt(4 * sigma * sigma + 1))) // 2 * 2 + 1)
    blur = _box3(image * m, width)
    weight = _box3(m, width)
    low = blur / np.maximum(weight, 1e-3)
    return np.where(mask, image - low, 0.0).astype(np.float32)


def grid_shape(section_shape: tuple[int, int], stride: int) -> tuple[int, int]:
    """Grid points at 0, stride, ... covering the section (the last at or past its edge)."""
    return tuple(-(-(s - 1) // stride) + 1 for s in section_shape)  # type: ignore[return-value]


def grid_points(section_shape: tuple[int, int], stride: int) -> np.ndarray:
    gy, gx = grid_shape(section_shape, stride)
    yy, xx = np.meshgrid(np.arange(gy) * stride, np.arange(gx) * stride, indexing="ij")
    return np.stack([yy, xx], axis=-1).astype(np.float64)


@dataclass
class PreparedSection:
    """A section as the matcher sees it, computed once and reused for every pair it is part of:
    texture mask, high-passed image at full and at coarse resolution, and (filled lazily) the
    Fourier transforms of its windowed reference patches, keyed by pass, and its spline
    coefficients for warping."""

    image: np.ndarray  # float32 as read
    mask: np.ndarray
    hp: np.ndarray
    coarse_hp: np.ndarray
    coarse_mask: np.ndarray
    factor: int
    transforms: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    @property
    def textured_fraction(self) -> float:
        return float(self.mask.mean())

    def inverted(self) -> "PreparedSection":
        """The same section with its contrast inverted (the high-pass just changes sign)."""
        return PreparedSection(255.0 - self.image, self.mask, -self.hp, -self.coarse_hp, self.coarse_mask, self.factor)

    def spline(self) -> np.ndarray:
        if "spline" not in self.cache:
            self.cache["spline"] = ndimage.spline_filter(self.hp, order=3, mode="mirror", output=np.float32)
        return self.cache["spline"]

    def integral(self, coarse: bool) -> np.ndarray:
        key = ("integral", coarse)
        if key not in self.cache:
            self.cache[key] = mask_integral(self.coarse_mask if coarse else self.mask)
        return self.cache[key]


def prepare_section(image: np.ndarray, config: FlowConfig, mask: np.ndarray | None = None) -> PreparedSection:
    image = np.asarray(image, dtype=np.float32)
    mask = section_mask(image) if mask is None else mask
    hp = highpass(image, mask, config.highpass_sigma)
    f = config.coarse_factor
    coarse_mask = downsample(mask, f) > 0.5
    coarse_hp = highpass(downsample(image, f), coarse_mask, config.highpass_sigma / f)
    return PreparedSection(image, mask, hp, coarse_hp, coarse_mask, f)


def mask_integral(mask: np.ndarray) -> np.ndarray:
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    out[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    return out


def mask_fractions(integral: np.ndarray, centers: np.ndarray, size: int) -> np.ndarray:
    """Fraction of each size x size patch centred on `centers` [n, 2] that lies in the mask."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    y0 = np.clip(centers[:, 0] - size // 2, 0, h)
    x0 = np.clip(centers[:, 1] - size // 2, 0, w)
    y1 = np.clip(centers[:, 0] - size // 2 + size, 0, h)
    x1 = np.clip(centers[:, 1] - size // 2 + size, 0, w)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / float(size * size)


# ---------------------------------------------------------------- patch correlation

def tukey_window(size: int, taper: float) -> np.ndarray:
    """2-D separable Tukey window: flat in the middle, cosine ramps over `taper` of each side."""
    w = np.ones(size, np.float32)
    k = int(round(taper * size))
    if k > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
        w[:k], w[size - k:] = ramp, ramp[::-1]
    return np.outer(w, w)


def patch_stack(image: np.ndarray, centers: np.ndarray, size: int) -> np.ndarray:
    """Square patches [n, size, size] centred on integer `centers`, zero outside the image; one
    strided gather from a padded copy (patches lying entirely outside come back as zeros)."""
    from numpy.lib.stride_tricks import sliding_window_view

    half = size // 2
    starts = np.asarray(centers, dtype=np.int64) - half
    lo = int(max(0, -starts.min()))
    hi_y = int(max(0, starts[:, 0].max() + size - image.shape[0]))
    hi_x = int(max(0, starts[:, 1].max() + size - image.shape[1]))
    padded = np.pad(image, ((lo, hi_y), (lo, hi_x))) if (lo or hi_y or hi_x) else image
    view = sliding_window_view(padded, (size, size))
    return view[starts[:, 0] + lo, starts[:, 1] + lo]


def windowed_patch_transforms(image: np.ndarray, centers: np.ndarray, size: int, taper: float,
                              workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """rfft2 of windowed, zero-mean patches [n, size, size//2+1] and each patch's energy (for
    normalising correlations). `image` is high-passed and 0 where masked, so masked pixels add
    nothing and the patch mean is small; the weighted mean is still taken out, or the window's own
    autocorrelation would pull every peak towards zero shift."""
    window = tukey_window(size, taper)
    weighted = patch_stack(image, centers, size)  # a gathered copy, safe to scale in place
    weighted = np.multiply(weighted, window, out=weighted) if weighted.dtype == np.float32 else weighted * window
    mean = weighted.sum(axis=(1, 2)) / window.sum()
    weighted -= mean[:, None, None] * window
    energy = np.sqrt(np.einsum("nij,nij->n", weighted, weighted))
    return scipy.fft.rfft2(weighted, workers=workers), energy


def circular_correlation(ref_fft: np.ndarray, mov_fft: np.ndarray, size: int, max_shift: int,
                         workers: int = 1, conjugated: bool = False) -> np.ndarray:
    """C(d) = sum_u ref(u) mov(u + d) for |d| <= max_shift (circular), centred: index `max_shift`
    is d = 0. For unit-energy patches C is a correlation coefficient. `conjugated`: `ref_fft`
    is already conjugated."""
    idx = np.r_[size - max_shift: size, 0: max_shift + 1]
    # A pruned inverse: the column transforms first, then the row transforms of only the rows
    # within max_shift (a quarter patch either way: about 3/4 of the work of a full irfft2).
    product = (ref_fft if conjugated else ref_fft.conj()) * mov_fft
    columns = scipy.fft.ifft(product, axis=1, workers=workers, overwrite_x=True)
    corr = scipy.fft.irfft(columns[:, idx], n=size, axis=2, workers=workers)
    return corr[:, :, idx]


def cross_correlate(ref: np.ndarray, mov: np.ndarray, max_shift: int) -> np.ndarray:
    """Batched cross-correlation C(d) = sum_u ref(u) mov(u + d) for |d| <= max_shift, without
    wrap-around (zero padding by max_shift), centred: index `max_shift` is d = 0.
    Inputs [n, size, size]. (Kept for whole-section matching; patches use the circular form.)"""
    n, size, _ = ref.shape
    length = scipy.fft.next_fast_len(size + max_shift + 1, real=True)
    shape = (length, length)
    fr = scipy.fft.rfft2(ref.astype(np.float32), s=shape)
    fm = scipy.fft.rfft2(mov.astype(np.float32), s=shape)
    corr = scipy.fft.irfft2(np.conj(fr) * fm, s=shape)
    corr = np.roll(corr, (max_shift, max_shift), axis=(1, 2))[:, : 2 * max_shift + 1, : 2 * max_shift + 1]
    return corr / float(size * size)


def _subpixel(c_minus: np.ndarray, c0: np.ndarray, c_plus: np.ndarray) -> np.ndarray:
    """Offset of a peak from three samples by a parabola. After the high-pass the peak is narrow
    and, after warping by the prior, near zero shift, where the parabola's bias vanishes; a
    Gaussian fit was no better there and fails on the negative side lobes of a high-passed peak."""
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = (c_minus - c_plus) / (2 * (c_minus - 2 * c0 + c_plus))
    offset = np.where(np.isfinite(offset), offset, 0.0)
    return np.clip(offset, -0.5, 0.5)


@dataclass(frozen=True)
class Peaks:
    shift: np.ndarray  # [n, 2] sub-pixel (dy, dx)
    sharpness: np.ndarray  # [n]
    ratio: np.ndarray  # [n]
    value: np.ndarray | None = None  # [n] the peak's correlation


def find_peaks(corr: np.ndarray, max_shift: int, exclusion: int, search: int | None = None) -> Peaks:
    """Best peak within `search` (default `max_shift`) of zero, its sub-pixel position and quality
    statistics; sharpness and the second peak are taken over the `max_shift` window (a peak's
    statistics over a window only a few pixels wide would say nothing)."""
    n, h, w = corr.shape
    cy, cx = h // 2, w // 2
    window = corr[:, cy - max_shift: cy + max_shift + 1, cx - max_shift: cx + max_shift + 1]
    flat = window.reshape(n, -1)
    search = max_shift if search is None else min(search, max_shift)
    if search < max_shift:
        ws = 2 * max_shift + 1
        inner = np.zeros((ws, ws), bool)
        inner[max_shift - search: max_shift + search + 1, max_shift - search: max_shift + search + 1] = True
        best = np.where(inner.ravel()[None, :], flat, -np.inf).argmax(axis=1)
    else:
        best = flat.argmax(axis=1)
    py, px = np.unravel_index(best, window.shape[1:])
    idx = np.arange(n)
    peak = flat[idx, best]
    mean = flat.mean(axis=1)
    std = flat.std(axis=1)
    sharpness = (peak - mean) / np.maximum(std, 1e-9)
    # Second peak: the maximum outside a small square around the first.
    ws = window.shape[1]
    rows = np.abs(np.arange(ws)[None, :] - py[:, None]) <= exclusion
    cols = np.abs(np.arange(ws)[None, :] - px[:, None]) <= exclusion
    near = rows[:, :, None] & cols[:, None, :]
    second = np.where(near, -np.inf, window).reshape(n, -1).max(axis=1)
    ratio = np.where(second > 0, peak / np.maximum(second, 1e-9), np.where(peak > 0, np.inf, 0.0))
    # Sub-pixel refinement on the full map (the neighbours of a peak on the window's edge exist there).
    gy, gx = py + cy - max_shift, px + cx - max_shift
    ymin, ymax = np.clip(gy - 1, 0, h - 1), np.clip(gy + 1, 0, h - 1)
    xmin, xmax = np.clip(gx - 1, 0, w - 1), np.clip(gx + 1, 0, w - 1)
    dy = _subpixel(corr[idx, ymin, gx], corr[idx, gy, gx], corr[idx, ymax, gx])
    dx = _subpixel(corr[idx, gy, xmin], corr[idx, gy, gx], corr[idx, gy, xmax])
    shift = np.stack([gy - cy + dy, gx - cx + dx], axis=1).astype(np.float64)
    return Peaks(shift, sharpness, ratio, peak)


def _ref_transforms(section: PreparedSection, coarse: bool, centers: np.ndarray, config: FlowConfig):
    """The reference's patch transforms, energies and mask fractions for one pass, cached."""
    key = (coarse, config.patch_size, config.taper, centers.shape[0], int(centers[-1, 0]), int(centers[-1, 1]))
    if key not in section.transforms:
        image = section.coarse_hp if coarse else section.hp
        frac = mask_fractions(section.integral(coarse), centers, config.patch_size)
        # Only patches that can pass the mask test are transformed (the rest stay zero).
        keep = np.flatnonzero(frac >= config.min_patch_mask_fraction)
        size = config.patch_size
        fft = np.zeros((len(centers), size, size // 2 + 1), np.complex64)
        energy = np.zeros(len(centers), np.float32)
        if len(keep):
            fft[keep], energy[keep] = windowed_patch_transforms(image, centers[keep], size, config.taper, config.workers)
        # Stored conjugated: the reference only ever enters a correlation that way.
        section.transforms[key] = (np.conj(fft, out=fft), energy, frac)
    return section.transforms[key]


def match_patches(ref: tuple, mov: np.ndarray, mov_frac: np.ndarray, centers: np.ndarray, config: FlowConfig,
                  max_shift: int) -> tuple[np.ndarray, np.ndarray, Peaks]:
    """Shifts of the moving patches at integer `centers` [n, 2] against the reference's
    (transform, energy, mask fraction): (shift [n, 2], usable [n] from the mask and peak tests, peaks).
    Patches whose masks already fail are not correlated at all."""
    size = config.patch_size
    ref_fft, ref_energy, ref_frac = ref
    n = len(centers)
    todo = np.flatnonzero((ref_frac >= config.min_patch_mask_fraction) & (mov_frac >= config.min_patch_mask_fraction))
    shift = np.zeros((n, 2))
    sharpness, ratio, value = np.zeros(n), np.zeros(n), np.zeros(n)
    if len(todo):
        mov_fft, mov_energy = windowed_patch_transforms(mov, centers[todo], size, config.taper, config.workers)
        # Statistics over a quarter patch of shifts either way, the peak searched within `max_shift`.
        span = max(size // 4, max_shift)
        corr = circular_correlation(ref_fft[todo], mov_fft, size, span + 1, config.workers, conjugated=True)
        corr /= np.maximum(ref_energy[todo] * mov_energy, 1e-12)[:, None, None].astype(np.float32)
        found = find_peaks(corr, max_shift=span, exclusion=config.peak_exclusion, search=max_shift)
        shift[todo], sharpness[todo], ratio[todo], value[todo] = found.shift, found.sharpness, found.ratio, found.value
    peaks = Peaks(shift, sharpness, ratio, value)
    usable = np.zeros(n, bool)
    usable[todo] = True
    usable &= (
        (sharpness >= config.min_peak_sharpness)
        & (ratio >= config.min_peak_ratio)
        & (value >= config.min_peak_correlation)
    )
    return shift, usable, peaks


# ---------------------------------------------------------------- field operations

def median_outliers(flow: np.ndarray, valid: np.ndarray, max_deviation: float) -> np.ndarray:
    """Valid vectors that agree with the median of their valid 3x3 neighbourhood (itself
    included); an isolated vector with no valid neighbour is dropped."""
    gy, gx, _ = flow.shape
    padded = np.full((gy + 2, gx + 2, 2), np.nan)
    padded[1:-1, 1:-1] = np.where(valid[..., None], flow, np.nan)
    stack = np.stack([padded[dy: dy + gy, dx: dx + gx] for dy in range(3) for dx in range(3)], axis=0)
    count = np.isfinite(stack[..., 0]).sum(axis=0)
    # Median over the valid neighbours: NaNs sort last, so it sits at (count - 1) / 2 of the
    # sorted stack (np.nanmedian takes a masked-array path ten times slower here).
    ordered = np.sort(stack, axis=0)
    lo = np.maximum(count - 1, 0) // 2
    hi = np.maximum(count, 1) // 2
    lo = np.broadcast_to(lo[None, ..., None], (1, gy, gx, 2))
    hi = np.broadcast_to(np.minimum(hi, 8)[None, ..., None], (1, gy, gx, 2))
    median = 0.5 * (np.take_along_axis(ordered, lo, 0)[0] + np.take_along_axis(ordered, hi, 0)[0])
    with np.errstate(invalid="ignore"):
        deviation = np.linalg.norm(flow - median, axis=-1)
    return valid & (count >= 2) & (deviation <= max_deviation)


def fill_invalid(flow: np.ndarray, valid: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """Invalid vectors take the nearest valid vector (a prior for the next pass; the mesh, not
    this, decides the final shape), or `fallback` where there is no valid vector at all."""
    if valid.all():
        return flow.copy()
    if not valid.any():
        return np.zeros_like(flow) if fallback is None else np.broadcast_to(fallback, flow.shape).copy()
    _, (iy, ix) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return flow[iy, ix]


def linear_weights(coords: np.ndarray, n: int) -> np.ndarray:
    """[len(coords), n] linear interpolation weights of grid index `coords` (clamped to the grid,
    i.e. constant beyond its ends)."""
    t = np.clip(np.asarray(coords, dtype=np.float64), 0, n - 1)
    i0 = np.minimum(np.floor(t).astype(np.int64), max(n - 2, 0))
    frac = t - i0
    w = np.zeros((len(t), n))
    rows = np.arange(len(t))
    w[rows, i0] = 1 - frac
    if n > 1:
        w[rows, i0 + 1] += frac
    return w


def dense_field(grid_values: np.ndarray, stride: int, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Bilinear interpolation of a [gy, gx, C] grid (points at stride*(i, j)) to the pixels
    origin + (0..shape), by separable interpolation matrices over only the grid rows and columns
    the region touches (much cheaper than map_coordinates per pixel)."""
    gy, gx = grid_values.shape[:2]
    ty = (origin[0] + np.arange(shape[0])) / stride
    tx = (origin[1] + np.arange(shape[1])) / stride
    i0, i1 = int(np.clip(np.floor(ty.min()), 0, gy - 1)), int(np.clip(np.ceil(ty.max()), 0, gy - 1)) + 1
    j0, j1 = int(np.clip(np.floor(tx.min()), 0, gx - 1)), int(np.clip(np.ceil(tx.max()), 0, gx - 1)) + 1
    wy = linear_weights(np.clip(ty, 0, gy - 1) - i0, i1 - i0)
    wx = linear_weights(np.clip(tx, 0, gx - 1) - j0, j1 - j0)
    sub = grid_values[i0:i1, j0:j1]
    rows = (wy @ sub.reshape(i1 - i0, -1)).reshape(len(ty), j1 - j0, -1)  # [h, gj, C]
    out = np.empty((len(ty), len(tx), sub.shape[-1]))
    for c in range(sub.shape[-1]):
        out[..., c] = rows[..., c] @ wx.T
    return out


def sample_field(grid_values: np.ndarray, stride: int, points: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a [gy, gx, C] grid at arbitrary pixel `points` [..., 2]."""
    coords = [points[..., 0] / stride, points[..., 1] / stride]
    return np.stack(
        [ndimage.map_coordinates(grid_values[..., c], coords, order=1, mode="nearest") for c in range(grid_values.shape[-1])],
        axis=-1,
    )


def patch_source(image: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """`image` shifted by a whole-pixel `offset` (out(p) = image(p + offset), 0 outside), so that
    moving patches can be cut at the reference's centres."""
    oy, ox = int(offset[0]), int(offset[1])
    h, w = image.shape
    out = np.zeros_like(image)
    ys, xs = slice(max(0, -oy), min(h, h - oy)), slice(max(0, -ox), min(w, w - ox))
    yt, xt = slice(max(0, oy), min(h, h + oy)), slice(max(0, ox), min(w, w + ox))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys, xs] = image[yt, xt]
    return out


def warp_prepared(section: PreparedSection, dense_flow: np.ndarray) -> np.ndarray:
    """The high-passed section resampled into the reference frame, out(x) = hp(x + F(x)), by a
    cubic spline (its coefficients cached on the section); 0 where x + F(x) is outside it.
    Cubic, not linear: linear interpolation shifts the phase of fine texture by up to a tenth of a
    pixel depending on the fractional position, which is a bias the fine pass would measure."""
    h, w = section.hp.shape
    coords = np.empty((2, h, w), np.float32)
    coords[0] = np.arange(h, dtype=np.float32)[:, None] + dense_flow[..., 0]
    coords[1] = np.arange(w, dtype=np.float32)[None, :] + dense_flow[..., 1]
    out = ndimage.map_coordinates(section.spline(), coords, order=3, mode="mirror", prefilter=False, output=np.float32)
    outside = (coords[0] < 0) | (coords[0] > h - 1) | (coords[1] < 0) | (coords[1] > w - 1)
    out[outside] = 0.0
    return out


# ---------------------------------------------------------------- the whole estimate

def _as_prepared(section, config: FlowConfig, mask: np.ndarray | None) -> PreparedSection:
    if isinstance(section, PreparedSection):
        return section
    return prepare_section(section, config, mask)


def coarse_prior(ref: PreparedSection, mov: PreparedSection, prior_shift: np.ndarray, shape: tuple[int, int],
                 config: FlowConfig) -> tuple[np.ndarray, int, np.ndarray]:
    """The coarse pass: (flow on a grid of `coarse_stride_factor * stride` px, its stride, valid),
    from block-averaged sections with moving patches centred on `prior_shift`."""
    f = config.coarse_factor
    stride = config.stride * config.coarse_stride_factor
    config = replace(config, patch_size=config.coarse_patch_size or max(8, config.patch_size // f))
    points = grid_points(shape, stride)
    centers = np.round(points.reshape(-1, 2) / f).astype(np.int64)
    offset = np.round(prior_shift / f).astype(np.int64)
    ref_data = _ref_transforms(ref, True, centers, config)
    # Half a patch of search is the most a windowed circular correlation can see.
    max_shift = config.patch_size // 4
    mov_frac = mask_fractions(mov.integral(True), centers + offset, config.patch_size)
    shift, usable, _ = match_patches(ref_data, patch_source(mov.coarse_hp, offset), mov_frac, centers, config,
                                     max_shift)
    flow = ((offset + shift) * f + (centers * f - points.reshape(-1, 2))).reshape(*points.shape[:2], 2)
    ok = median_outliers(flow, usable.reshape(points.shape[:2]), config.max_median_deviation * f * 2)
    return flow, stride, ok


def estimate_flow(ref, mov, prior_shift: tuple[float, float] = (0.0, 0.0), config: FlowConfig = FlowConfig(),
                  ref_mask: np.ndarray | None = None, mov_mask: np.ndarray | None = None) -> FlowField:
    """Two-pass flow from `ref` to `mov` (2-D arrays of the same shape, or `PreparedSection`s)
    around `prior_shift`."""
    ref = _as_prepared(ref, config, ref_mask)
    mov = _as_prepared(mov, config, mov_mask)
    shape = ref.image.shape
    if ref.image.shape != mov.image.shape or ref.image.ndim != 2:
        raise InputError(f"flow: sections of shapes {ref.image.shape} and {mov.image.shape}; expected two equal 2-D arrays")
    prior_shift = np.asarray(prior_shift, dtype=np.float64)
    points = grid_points(shape, config.stride)
    gshape = points.shape[:2]

    coarse, coarse_stride, coarse_ok = coarse_prior(ref, mov, prior_shift, shape, config)
    prior_grid = fill_invalid(coarse, coarse_ok, fallback=prior_shift)
    if coarse_ok.sum() >= 3:
        # The prior must be smooth: a 3x3 mean over the filled coarse grid (the fine pass measures
        # the detail it leaves out, within `max_residual`).
        prior_grid = np.stack([ndimage.uniform_filter(prior_grid[..., c], 3, mode="nearest") for c in range(2)], -1)

    centers = np.round(points.reshape(-1, 2)).astype(np.int64)
    ref_data = _ref_transforms(ref, False, centers, config)
    current_grid, current_stride = prior_grid, coarse_stride
    max_shift = max(2, int(np.ceil(config.max_residual)) + 1)
    for _ in range(config.refine_iterations):
        dense = dense_field(current_grid, current_stride, shape).astype(np.float32)
        warped = warp_prepared(mov, dense)
        # Mask fractions of the moving patches where the prior puts them (warping the mask too
        # would cost as much as warping the image).
        at_prior = centers + np.round(sample_field(current_grid, current_stride, points.reshape(-1, 2))).astype(np.int64)
        mov_frac = mask_fractions(mov.integral(False), at_prior, config.patch_size)
        residual, usable, peaks = match_patches(ref_data, warped, mov_frac, centers, config, max_shift)
        # Content at p is at p + r in the warped section, i.e. at (p + r) + prior(p + r) in mov.
        at = points.reshape(-1, 2) + residual
        flow = (residual + sample_field(current_grid, current_stride, at)).reshape(*gshape, 2)
        usable = usable & (np.linalg.norm(residual, axis=1) <= config.max_residual)
        ok = median_outliers(flow, usable.reshape(gshape), config.max_median_deviation)
        current_grid, current_stride = fill_invalid(flow, ok, fallback=prior_shift), config.stride
    if not ok.any():
        flow = sample_field(prior_grid, coarse_stride, points)
    merged = fill_invalid(flow, ok, fallback=prior_shift)
    return FlowField(merged, ok, config.stride, peaks.sharpness.reshape(gshape), peaks.ratio.reshape(gshape))


def estimate_flow_tiled(read_ref, read_mov, shape: tuple[int, int], prior_shift: tuple[float, float],
                        config: FlowConfig, tile_size: int | None = None) -> FlowField:
    """`estimate_flow` for sections too big to hold: the grid is cut into tiles of about
    `tile_size` px, each matched on windows read with `read_ref(y0, y1, x0, x1)` and
    `read_mov(...)` (zero outside the section), the moving window offset by the whole-pixel prior.
    Windows overlap by a margin that holds every patch, the coarse pass and the median test of a
    tile's own grid points, so the stitched field equals the whole-section one up to the
    coarse pass's smoothing near tile seams."""
    tile = tile_size or config.tile_size or max(shape)
    stride = config.stride
    gshape = grid_shape(shape, stride)
    coarse_stride = stride * config.coarse_stride_factor
    # Margin in whole coarse strides: a coarse patch's footprint, the coarse 3x3 smoothing and
    # the median test around a tile's own points.
    reach = config.patch_size * config.coarse_factor // 2 + 3 * coarse_stride
    margin = -(-reach // coarse_stride) * coarse_stride
    step = max(coarse_stride, (tile // coarse_stride) * coarse_stride)
    whole = np.round(np.asarray(prior_shift, dtype=np.float64)).astype(np.int64)
    local_prior = np.asarray(prior_shift, dtype=np.float64) - whole
    flow = np.zeros((*gshape, 2))
    valid = np.zeros(gshape, bool)
    sharp = np.zeros(gshape)
    ratio = np.zeros(gshape)
    for ty in range(0, gshape[0] * stride, step):
        for tx in range(0, gshape[1] * stride, step):
            y0, x0 = ty - margin, tx - margin
            y1, x1 = min(ty + step, gshape[0] * stride) + margin, min(tx + step, gshape[1] * stride) + margin
            ref = np.asarray(read_ref(y0, y1, x0, x1), dtype=np.float32)
            mov = np.asarray(read_mov(y0 + whole[0], y1 + whole[0], x0 + whole[1], x1 + whole[1]), dtype=np.float32)
            if not (ref > 0).any() or not (mov > 0).any():
                continue
            part = estimate_flow(ref, mov, tuple(local_prior), config)
            # Local grid point k sits at y0 + k * stride; keep those of this tile.
            i0, j0 = ty // stride, tx // stride
            i1 = min(gshape[0], (ty + step) // stride)
            j1 = min(gshape[1], (tx + step) // stride)
            ki, kj = (ty - y0) // stride, (tx - x0) // stride
            sl = (slice(ki, ki + i1 - i0), slice(kj, kj + j1 - j0))
            flow[i0:i1, j0:j1] = part.flow[sl] + whole
            valid[i0:i1, j0:j1] = part.valid[sl]
            sharp[i0:i1, j0:j1] = part.sharpness[sl]
            ratio[i0:i1, j0:j1] = part.peak_ratio[sl]
    flow = fill_invalid(flow, valid, fallback=np.asarray(prior_shift, dtype=np.float64))
    return FlowField(flow, valid, stride, sharp, ratio)
