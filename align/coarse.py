"""Coarse alignment: whole-section translation from masked, normalised cross-correlation of
downsampled sections, and a robust affine fit to point matches (for rotation/shear).

Translations between neighbours are chained through the stack by the caller (`chain`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

from exaconnect.errors import InputError
from exaconnect.align.flow import downsample, section_mask


@dataclass(frozen=True)
class CoarseConfig:
    downsample: int = 4
    # Shifts whose overlap is below this fraction of the smaller mask are not considered: a
    # correlation over a sliver of overlap is noise that can beat the true peak.
    min_overlap: float = 0.3
    # The peak's normalised correlation must reach this to count as a match (EM neighbours
    # give 0.3-0.9; unrelated or contrast-inverted sections give < 0.1).
    min_correlation: float = 0.15

    def __post_init__(self) -> None:
        if self.downsample < 1 or not 0 < self.min_overlap < 1:
            raise InputError(f"coarse config {self}: expected downsample >= 1 and 0 < min_overlap < 1")


@dataclass(frozen=True)
class CoarseMatch:
    shift: tuple[float, float]  # (dy, dx) full-resolution px: ref(p) ~ mov(p + shift)
    correlation: float

    def ok(self, config: CoarseConfig) -> bool:
        return self.correlation >= config.min_correlation


def _xcorr_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full linear cross-correlation sum_u a(u) b(u + d), centred at d = 0 (index shape // 2).
    Padded to a fast FFT length at least a + b, so no lag wraps: 2 x 62 px sections pad to 124
    = 4 x 31, whose prime factor made this one call cost as much as the patch transforms of a pair."""
    shape = tuple(scipy.fft.next_fast_len(a.shape[i] + b.shape[i], real=True) for i in range(2))
    out = scipy.fft.irfft2(np.conj(scipy.fft.rfft2(a, s=shape)) * scipy.fft.rfft2(b, s=shape), s=shape)
    return np.fft.fftshift(out)


def masked_ncc(ref: np.ndarray, ref_mask: np.ndarray, mov: np.ndarray, mov_mask: np.ndarray,
               min_overlap: float) -> np.ndarray:
    """Normalised cross-correlation over the overlap of two masks at every shift (after
    Padfield, 'Masked object registration in the Fourier domain', 2012, simplified to global
    normalisation and division by the overlap count)."""
    ma, mb = ref_mask.astype(np.float64), mov_mask.astype(np.float64)
    a = np.where(ref_mask, ref - ref[ref_mask].mean(), 0.0) if ref_mask.any() else np.zeros_like(ref, dtype=float)
    b = np.where(mov_mask, mov - mov[mov_mask].mean(), 0.0) if mov_mask.any() else np.zeros_like(mov, dtype=float)
    a /= max(a[ref_mask].std() if ref_mask.any() else 1.0, 1e-9)
    b /= max(b[mov_mask].std() if mov_mask.any() else 1.0, 1e-9)
    num = _xcorr_full(a, b)
    overlap = _xcorr_full(ma, mb)
    need = min_overlap * min(ma.sum(), mb.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        ncc = np.where(overlap >= max(need, 1.0), num / overlap, -np.inf)
    return ncc


def estimate_translation(ref: np.ndarray, mov: np.ndarray, config: CoarseConfig = CoarseConfig(),
                         ref_mask: np.ndarray | None = None, mov_mask: np.ndarray | None = None) -> CoarseMatch:
    """Whole-pixel (at the downsampled scale) translation of `mov` relative to `ref`; the flow
    stage refines it, so a parabolic sub-sample fit is enough here."""
    f = config.downsample
    ref_mask = section_mask(ref) if ref_mask is None else ref_mask
    mov_mask = section_mask(mov) if mov_mask is None else mov_mask
    if not ref_mask.any() or not mov_mask.any():
        return CoarseMatch((0.0, 0.0), 0.0)
    r, m = downsample(ref, f), downsample(mov, f)
    rm, mm = downsample(ref_mask, f) > 0.99, downsample(mov_mask, f) > 0.99
    ncc = masked_ncc(r, rm, m, mm, config.min_overlap)
    if not np.isfinite(ncc).any():
        return CoarseMatch((0.0, 0.0), 0.0)
    py, px = np.unravel_index(np.nanargmax(ncc), ncc.shape)
    peak = float(ncc[py, px])
    sub = []
    for axis, p in ((0, py), (1, px)):
        lo = ncc[(p - 1, px) if axis == 0 else (py, p - 1)] if p > 0 else -np.inf
        hi = ncc[(p + 1, px) if axis == 0 else (py, p + 1)] if p + 1 < ncc.shape[axis] else -np.inf
        denom = lo - 2 * peak + hi
        sub.append(0.5 * (lo - hi) / denom if np.isfinite(denom) and denom < 0 else 0.0)
    cy, cx = ncc.shape[0] // 2, ncc.shape[1] // 2
    shift = ((py - cy + sub[0]) * f, (px - cx + sub[1]) * f)
    return CoarseMatch((float(shift[0]), float(shift[1])), peak)


def fit_affine(points: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None,
               iterations: int = 3, clip: float = 3.0) -> np.ndarray:
    """Least-squares affine A (2x3) with targets ~ A @ [p, 1], re-weighted to ignore outliers
    (residuals beyond `clip` robust standard deviations). Points [n, 2] in (y, x)."""
    points = np.asarray(points, float).reshape(-1, 2)
    targets = np.asarray(targets, float).reshape(-1, 2)
    w = np.ones(len(points)) if weights is None else np.asarray(weights, float).reshape(-1).copy()
    if (w > 0).sum() < 3:
        shift = (targets - points)[w > 0].mean(axis=0) if (w > 0).any() else np.zeros(2)
        return np.hstack([np.eye(2), shift[:, None]])
    design = np.hstack([points, np.ones((len(points), 1))])
    affine = np.hstack([np.eye(2), np.zeros((2, 1))])
    for _ in range(iterations):
        sw = np.sqrt(w)[:, None]
        solution, *_ = np.linalg.lstsq(design * sw, targets * sw, rcond=None)
        affine = solution.T
        residual = np.linalg.norm(design @ solution - targets, axis=1)
        scale = 1.4826 * np.median(residual[w > 0]) + 1e-3
        w = np.where(residual <= clip * scale, w, 0.0)
        if (w > 0).sum() < 3:
            break
    return affine


def fit_rigid(points: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares rotation + translation as a 2x3 affine (Kabsch). Points [n, 2]."""
    points = np.asarray(points, float).reshape(-1, 2)
    targets = np.asarray(targets, float).reshape(-1, 2)
    w = np.ones(len(points)) if weights is None else np.asarray(weights, float).reshape(-1)
    if w.sum() <= 0:
        return np.hstack([np.eye(2), np.zeros((2, 1))])
    w = w / w.sum()
    cp, ct = w @ points, w @ targets
    h = ((points - cp) * w[:, None]).T @ (targets - ct)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rotation = vt.T @ np.diag([1.0, d]) @ u.T
    return np.hstack([rotation, (ct - rotation @ cp)[:, None]])


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:, :2].T + affine[:, 2]


def rotation_degrees(affine: np.ndarray) -> float:
    """The rotation part of an affine (polar decomposition), in degrees, for reports."""
    u, _, vt = np.linalg.svd(affine[:, :2])
    r = u @ vt
    return float(np.degrees(np.arctan2(r[1, 0], r[0, 0])))
