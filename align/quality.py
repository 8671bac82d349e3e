"""Alignment quality: chunked neighbour correlation, residual flow, end-point error against a
known truth, and a one-page PNG report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exaconnect.align.flow import FlowConfig, estimate_flow, section_mask
from exaconnect.align.warp import region_map


def chunked_correlation(a: np.ndarray, b: np.ndarray, chunk: int = 50, valid: np.ndarray | None = None,
                        min_valid: float = 0.95) -> float:
    """Mean Pearson correlation of two sections over chunk x chunk tiles (the usual alignment
    score: local, so a vignetting gradient does not dominate). Tiles where fewer than
    `min_valid` of the pixels are valid in both, or that are flat, are left out; NaN if none is left."""
    values = []
    for y in range(0, a.shape[0] - chunk + 1, chunk):
        for x in range(0, a.shape[1] - chunk + 1, chunk):
            ta = a[y: y + chunk, x: x + chunk].astype(np.float64).ravel()
            tb = b[y: y + chunk, x: x + chunk].astype(np.float64).ravel()
            if valid is not None and valid[y: y + chunk, x: x + chunk].mean() < min_valid:
                continue
            if ta.std() < 1e-6 or tb.std() < 1e-6:
                continue
            values.append(np.corrcoef(ta, tb)[0, 1])
    return float(np.mean(values)) if values else float("nan")


def neighbor_correlations(stack: np.ndarray, sections: list[int], chunk: int = 50) -> dict[int, float]:
    """Correlation of each listed section with the previous listed one (pairs of consecutive
    entries), on pixels that hold data (non-zero) in both."""
    out = {}
    for prev, z in zip(sections[:-1], sections[1:]):
        valid = (stack[prev] > 0) & (stack[z] > 0)
        out[z] = chunked_correlation(stack[prev], stack[z], chunk, valid)
    return out


def residual_flow(stack: np.ndarray, sections: list[int], config: FlowConfig) -> dict[int, dict]:
    """Flow left between consecutive listed sections after alignment: median and 95th
    percentile length over valid vectors, and the valid fraction."""
    out = {}
    for prev, z in zip(sections[:-1], sections[1:]):
        field = estimate_flow(stack[prev].astype(np.float32), stack[z].astype(np.float32), (0.0, 0.0), config)
        lengths = np.linalg.norm(field.flow[field.valid], axis=-1)
        out[z] = {
            "median_px": float(np.median(lengths)) if lengths.size else float("nan"),
            "p95_px": float(np.percentile(lengths, 95)) if lengths.size else float("nan"),
            "valid_fraction": field.valid_fraction,
        }
    return out


# ---------------------------------------------------------------- error against a known truth

def _fit_rigid(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rotation R and translation t with dst ~ src @ R.T + t (Kabsch)."""
    cs, cd = src.mean(axis=0), dst.mean(axis=0)
    h = (src - cs).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, d]) @ u.T
    return r, cd - cs @ r.T


@dataclass(frozen=True)
class EndPointError:
    median: float
    rms: float
    p95: float
    max: float
    per_section_rms: dict

    def as_dict(self) -> dict:
        return {"epe_median_px": self.median, "epe_rms_px": self.rms, "epe_p95_px": self.p95, "epe_max_px": self.max}


def end_point_error(meshes: dict[int, np.ndarray], stride: int, truth, sections: list[int], out_shape: tuple[int, int],
                    sample_step: int = 5, margin: int = 10,
                    reference_meshes: dict[int, np.ndarray] | None = None) -> EndPointError:
    """Compare where each output pixel comes from in the *original* stack with one global rigid
    transform fitted over all listed sections. `truth.source_positions(z, p)` maps misaligned
    pixels p to original positions; the aligner's mesh maps output pixels to misaligned ones.
    Only output pixels whose source lies inside both the misaligned and the original section count.

    With `reference_meshes` (the aligner's own meshes for the unperturbed stack), the target is
    where that run took each output pixel from instead of the pixel itself: this isolates how
    well the applied perturbation was undone from what the aligner does to the unperturbed stack."""
    h, w = truth.shape
    ys = np.arange(margin, out_shape[0] - margin, sample_step)
    xs = np.arange(margin, out_shape[1] - margin, sample_step)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    q = np.stack([yy, xx], axis=-1).reshape(-1, 2).astype(float)
    sources, origins, owner = [], [], []
    for z in sections:
        positions = region_map(meshes[z], stride, (0, out_shape[0], 0, out_shape[1]))[yy, xx].reshape(-1, 2)
        original = truth.source_positions(z, positions)
        inside = ((positions >= 0) & (positions <= np.array([h - 1, w - 1]))).all(axis=1)
        inside &= ((original >= 0) & (original <= np.array([h - 1, w - 1]))).all(axis=1)
        if reference_meshes is not None:
            target = region_map(reference_meshes[z], stride, (0, out_shape[0], 0, out_shape[1]))[yy, xx].reshape(-1, 2)
        else:
            target = q
        sources.append(target[inside])
        origins.append(original[inside])
        owner.append(np.full(int(inside.sum()), z))
    src, dst, own = np.concatenate(sources), np.concatenate(origins), np.concatenate(owner)
    r, t = _fit_rigid(src, dst)
    err = np.linalg.norm(src @ r.T + t - dst, axis=1)
    per = {int(z): float(np.sqrt(np.mean(err[own == z] ** 2))) for z in sections if (own == z).any()}
    return EndPointError(float(np.median(err)), float(np.sqrt(np.mean(err**2))), float(np.percentile(err, 95)),
                         float(err.max()), per)


# ---------------------------------------------------------------- report figure

def report_figure(path: str, sections: list[int], before: dict[int, float], after: dict[int, float],
                  residual: dict[int, dict], valid_fraction: dict[int, float], statuses: dict[int, str],
                  before_crop: np.ndarray, after_crop: np.ndarray) -> None:
    """Per-section plots (correlation before/after, residual flow, valid flow fraction) and a
    before/after x-z reslice, where misalignment shows as jagged membranes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 10), gridspec_kw={"width_ratios": [2, 1]})
    zs = sorted(after)
    axes[0, 0].plot(sorted(before), [before[z] for z in sorted(before)], ".-", label="before", color="tab:red")
    axes[0, 0].plot(zs, [after[z] for z in zs], ".-", label="after", color="tab:blue")
    axes[0, 0].set_ylabel("neighbour correlation")
    axes[0, 0].legend()
    rz = sorted(residual)
    axes[1, 0].plot(rz, [residual[z]["median_px"] for z in rz], ".-", label="median")
    axes[1, 0].plot(rz, [residual[z]["p95_px"] for z in rz], ".-", label="95th pct")
    axes[1, 0].set_ylabel("residual flow (px)")
    axes[1, 0].legend()
    vz = sorted(valid_fraction)
    axes[2, 0].plot(vz, [valid_fraction[z] for z in vz], ".-", color="tab:green")
    bad = [z for z, s in statuses.items() if s not in ("ok", "first")]
    for z in bad:
        for ax in axes[:, 0]:
            ax.axvline(z, color="0.7", lw=0.8)
        axes[2, 0].annotate(statuses[z], (z, 0.02), rotation=90, fontsize=7)
    axes[2, 0].set_ylabel("valid flow fraction")
    axes[2, 0].set_xlabel("section z")
    axes[0, 1].imshow(before_crop, cmap="gray", aspect="auto")
    axes[0, 1].set_title("before (x-z reslice)")
    axes[1, 1].imshow(after_crop, cmap="gray", aspect="auto")
    axes[1, 1].set_title("after (x-z reslice)")
    axes[2, 1].axis("off")
    axes[2, 1].text(0, 0.5, "\n".join(f"{z}: {s}" for z, s in sorted(statuses.items()) if s not in ("ok", "first"))[:800] or "all sections ok",
                    fontsize=8, va="center")
    for ax in (axes[0, 1], axes[1, 1]):
        ax.set_xticks([])
        ax.set_ylabel("z")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def textured_fraction(section: np.ndarray) -> float:
    return float(section_mask(section).mean())


def neighbor_end_point_error(meshes: dict[int, np.ndarray], stride: int, truth, sections: list[int],
                             out_shape: tuple[int, int], sample_step: int = 5, margin: int = 10) -> EndPointError:
    """Relative error between consecutive listed sections: an output pixel q of sections a and b
    should show the same place of the original stack, T_a(M_a(q)) = T_b(M_b(q)). This is the
    part of the alignment that matching neighbours determines (what segmentation feels); the
    stack-wide error of `end_point_error` adds what accumulates along z."""
    h, w = truth.shape
    ys = np.arange(margin, out_shape[0] - margin, sample_step)
    xs = np.arange(margin, out_shape[1] - margin, sample_step)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    limit = np.array([h - 1, w - 1])
    errors, per = [], {}
    originals = {}
    for z in sections:
        positions = region_map(meshes[z], stride, (0, out_shape[0], 0, out_shape[1]))[yy, xx].reshape(-1, 2)
        original = truth.source_positions(z, positions)
        inside = ((positions >= 0) & (positions <= limit)).all(axis=1) & ((original >= 0) & (original <= limit)).all(axis=1)
        originals[z] = (original, inside)
    for a, b in zip(sections[:-1], sections[1:]):
        (oa, ia), (ob, ib) = originals[a], originals[b]
        err = np.linalg.norm(oa - ob, axis=1)[ia & ib]
        if err.size:
            errors.append(err)
            per[int(b)] = float(np.sqrt(np.mean(err**2)))
    err = np.concatenate(errors)
    return EndPointError(float(np.median(err)), float(np.sqrt(np.mean(err**2))), float(np.percentile(err, 95)),
                         float(err.max()), per)
