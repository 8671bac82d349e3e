"""How well a stitched section matches the section its tiles were cut from: the displacement of
each patch (sub-pixel phase correlation) after removing the global offset, the measure of
issue 22's acceptance (median <= 0.3 px, P95 <= 1 px, every patch covered); and how well
neighbouring tiles agree where they overlap (`seam_errors`), what a blend shows as doubled or
blurred membranes."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from exaconnect.montage.render import PlacedTile, render_box


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


def seam_errors(tiles: Sequence[PlacedTile], pairs: Sequence[tuple[int, int]], patch: int = 24,
                upsample: int = 20) -> dict:
    """How far apart two neighbours show the same content where they overlap, measured on the
    pixels each renders alone (independent of the solve's own residuals): over a grid of square
    patches (side `patch`, at most the overlap's narrow side, at least 8) within each pair's
    common footprint, the sub-pixel shift between the two renderings. Figures in px over all
    patches of all `pairs` (indices into `tiles`)."""
    from skimage.registration import phase_cross_correlation

    shifts = []
    for a, b in pairs:
        ta, tb = tiles[a], tiles[b]
        reach = [0.0 if t.mesh is None else float(np.abs(t.mesh).max()) for t in (ta, tb)]
        m = int(np.ceil(max(reach))) + 1
        x0 = int(np.ceil(max(ta.x, tb.x))) + m
        y0 = int(np.ceil(max(ta.y, tb.y))) + m
        x1 = int(np.floor(min(ta.x + ta.pixels.shape[1], tb.x + tb.pixels.shape[1]))) - m
        y1 = int(np.floor(min(ta.y + ta.pixels.shape[0], tb.y + tb.pixels.shape[0]))) - m
        side = min(patch, x1 - x0, y1 - y0)
        if side < 8:
            continue
        box = (x0, y0, x1, y1)
        ra, rb = render_box(box, [ta], np.float64), render_box(box, [tb], np.float64)
        step = max(1, side // 2)
        for y in range(0, y1 - y0 - side + 1, step):
            for x in range(0, x1 - x0 - side + 1, step):
                pa, pb = ra[y: y + side, x: x + side], rb[y: y + side, x: x + side]
                if pa.std() < 1e-6 or pb.std() < 1e-6:
                    continue
                shift, _, _ = phase_cross_correlation(pa, pb, upsample_factor=upsample, normalization=None)
                shifts.append(np.hypot(*shift))
    if not shifts:
        return {"patches": 0, "median_px": None, "p95_px": None, "max_px": None}
    shifts = np.array(shifts)
    return {"patches": int(len(shifts)), "median_px": float(np.median(shifts)),
            "p95_px": float(np.percentile(shifts, 95)), "max_px": float(shifts.max())}
