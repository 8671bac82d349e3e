"""How well a stitched section matches the section its tiles were cut from: the displacement of
each patch (sub-pixel phase correlation) after removing the global offset, the measure of
issue 22's acceptance (median <= 0.3 px, P95 <= 1 px, every patch covered)."""

from __future__ import annotations

import numpy as np


def patch_errors(stitched: np.ndarray, truth: np.ndarray, patch: int = 48, step: int = 32,
                 upsample: int = 20) -> dict:
    """Per-patch displacement (px) of `stitched` against `truth` (same shape), minus the median
    displacement; patches not fully covered (zeros in `stitched`) count as uncovered."""
    from skimage.registration import phase_cross_correlation

    shifts, uncovered, total = [], 0, 0
    for y in range(0, truth.shape[0] - patch + 1, step):
        for x in range(0, truth.shape[1] - patch + 1, step):
            a = truth[y: y + patch, x: x + patch].astype(np.float64)
            b = stitched[y: y + patch, x: x + patch].astype(np.float64)
            total += 1
            if (b == 0).mean() > 0.01:
                uncovered += 1
                continue
            if a.std() < 1e-6 or b.std() < 1e-6:
                continue
            shift, _, _ = phase_cross_correlation(a, b, upsample_factor=upsample, normalization=None)
            shifts.append(shift)
    if not shifts:
        return {"patches": total, "uncovered": uncovered, "median_px": None, "p95_px": None, "max_px": None}
    shifts = np.array(shifts)
    errors = np.hypot(*(shifts - np.median(shifts, axis=0)).T)
    return {"patches": total, "uncovered": uncovered, "median_px": float(np.median(errors)),
            "p95_px": float(np.percentile(errors, 95)), "max_px": float(errors.max())}
