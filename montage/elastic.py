"""Elastic refinement of a rigid montage: flow fields in the overlaps and one spring mesh per tile,
relaxed jointly for the whole section (the idea of SOFIMA's `stitch_elastic`, our own code).

Lens distortion and a small per-tile affine make two neighbours disagree by an amount that
varies along their seam; a translation per tile can only split the difference on average.

  1. `pair_flow`: for a pair placed by its rigid offset `d` (b's top-left minus a's, x/y),
     patches of tile a on a grid over the overlap are found in tile b by normalised cross-
     correlation within `search_px` of where the rigid offset puts them: content at a's pixel
     u_a is at b's pixel u_b = u_a - d + f. Vectors that disagree with their neighbours along
     the seam are dropped.
  2. `relax_meshes`: every tile carries a mesh of nodes on a regular grid over its footprint
     (`mesh_cells` cells per side), whose unknowns are the displacements D of the nodes from
     the rigid placement: tile pixel u of a tile at p lands at p + u + D(u), D interpolated
     bilinearly. A flow point asks D_a(u_a) - D_b(u_b) = p_b - p_a - d + f (the two tiles show
     that content at one place). Springs inside each tile keep its shape: `stretch` resists
     changes of the differences between neighbouring nodes, `bend` changes of their second
     differences (thin-plate), both measured on D minus the tile's own radial lens term
     d |d|^2 / r^2 about its centre, whose coefficient is a free unknown per tile: a lens
     costs nothing, any other warp does. Seams alone cannot tell a lens from a stretched tile
     (both move the seam the same way); the radial term is the first term of every lens model
     and tells them apart by how the disagreement varies along the seam. A tiny pull to D = 0
     fixes what no flow reaches (a tile without pairs stays rigid). Linear springs make the
     equilibrium one sparse solve per section (the small-strain limit of the Hookean mesh
     SOFIMA integrates). Points whose residual stays above `max_residual_px` are dropped and
     the mesh solved again (at most twice).
  3. `mesh_coordinates`: the inverse map for rendering: for each output pixel P the tile pixel
     u with p + u + D(u) = P, by fixed-point iteration on a coarse grid of output points and
     bilinear interpolation between them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import fft as sfft
from scipy import sparse
from scipy.sparse.linalg import splu

from exaconnect.errors import InputError
from exaconnect.montage.match import signal_mask


@dataclass(frozen=True)
class ElasticConfig:
    """`patch_px`: side of the flow patches (at most a quarter tile, narrowed across a narrow
    overlap, at least `min_patch_px`); `stride_px`: spacing of the flow grid (0: half the mesh
    spacing, at least a quarter patch); `search_px`: how far a patch may be from where the
    rigid offset puts it; `min_correlation`: a patch's peak correlation; `max_deviation_px`:
    from the median of its neighbours along the seam. Mesh: `mesh_cells` per tile side;
    `stretch` and `bend` spring weights relative to the flow (each pair's points share one unit
    of weight per mesh cell along the seam); `radial_lens`: each tile may take a radial lens
    distortion about its centre at no spring cost. Measured on FIB-25 tiles with affine 0.005
    and 4 px lens distortion (bench/bench_montage.py): without the radial term the mesh makes
    the seams agree but cannot tell a lens from a per-tile stretch, and the patch error against
    the original stays near rigid's; 8 cells did better than 12 and cost half as much."""

    enabled: bool = True
    patch_px: int = 64
    min_patch_px: int = 8
    stride_px: int = 0
    search_px: int = 4
    min_correlation: float = 0.6
    max_deviation_px: float = 1.0
    mesh_cells: int = 8
    stretch: float = 1.0
    bend: float = 10.0
    prior_weight: float = 1e-4
    max_residual_px: float = 1.5
    radial_lens: bool = True

    def __post_init__(self) -> None:
        if self.min_patch_px < 6 or self.patch_px < self.min_patch_px:
            raise InputError(f"montage elastic.patch_px {self.patch_px} / min_patch_px {self.min_patch_px}: "
                             "expected 6 <= min_patch_px <= patch_px")
        if self.stride_px < 0 or self.search_px < 1:
            raise InputError(f"montage elastic.stride_px {self.stride_px} / search_px {self.search_px}: "
                             "expected stride >= 0 (0: automatic) and search >= 1")
        if not -1 <= self.min_correlation <= 1:
            raise InputError(f"montage elastic.min_correlation {self.min_correlation}: expected in [-1, 1]")
        if self.mesh_cells < 1:
            raise InputError(f"montage elastic.mesh_cells {self.mesh_cells}: expected >= 1")
        if self.stretch < 0 or self.bend < 0 or self.stretch + self.bend <= 0:
            raise InputError(f"montage elastic.stretch {self.stretch} / bend {self.bend}: expected >= 0, not both 0")
        if not 0 < self.prior_weight < 1:
            raise InputError(f"montage elastic.prior_weight {self.prior_weight}: expected in (0, 1)")
        if self.max_deviation_px <= 0 or self.max_residual_px <= 0:
            raise InputError(f"montage elastic.max_deviation_px {self.max_deviation_px} / max_residual_px "
                             f"{self.max_residual_px}: expected > 0")


# ---------------------------------------------------------------- flow in one overlap

def _box_sums(values: np.ndarray, size: tuple[int, int], count: int) -> np.ndarray:
    """Sums over every size (h, w) window at offsets 0..count-1 (both axes) of [n, H, W] arrays."""
    (sy, sx), c = size, count
    integral = np.zeros((values.shape[0], values.shape[1] + 1, values.shape[2] + 1))
    integral[:, 1:, 1:] = values.cumsum(1).cumsum(2)
    return (integral[:, sy: sy + c, sx: sx + c] - integral[:, :c, sx: sx + c]
            - integral[:, sy: sy + c, :c] + integral[:, :c, :c])


def patch_ncc(templates: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Pearson correlation of each template [n, Py, Px] with every Py x Px part of its window
    [n, Py + 2r, Px + 2r]: [n, 2r + 1, 2r + 1], index (r, r) where the template sits in the middle."""
    n, py, px = templates.shape
    shape = windows.shape[1:]
    count = shape[0] - py + 1
    t = templates - templates.mean(axis=(1, 2), keepdims=True)
    w = windows - windows.mean(axis=(1, 2), keepdims=True)
    # No wrap-around: the template is zero beyond its own size, and offsets stop at 2r.
    product = sfft.rfft2(w, shape) * np.conj(sfft.rfft2(t, shape))
    numerator = sfft.irfft2(product, shape)[:, :count, :count]
    sums, squares = _box_sums(w, (py, px), count), _box_sums(w * w, (py, px), count)
    variance = np.maximum(squares - sums ** 2 / (py * px), 0.0)
    norm = np.sqrt((t * t).sum(axis=(1, 2)))[:, None, None] * np.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm > 1e-9, numerator / norm, 0.0)


def _parabola(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
    curvature = minus - 2 * centre + plus
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, 0.5 * (minus - plus) / curvature, 0.0)
    return np.clip(offset, -0.5, 0.5)


def _overlap_grid(shape_a: tuple[int, int], shape_b: tuple[int, int], offset: tuple[float, float],
                  patch: tuple[int, int], margin: int, stride: float) -> np.ndarray:
    """Integer patch centres (row, col) in tile a, on a grid [gy, gx, 2] over the overlap, whose
    patch (h, w) lies in a and whose patch grown by `margin` lies in b at the rigid offset."""
    dx, dy = offset
    axes = []
    for size_a, size_b, d, p in ((shape_a[0], shape_b[0], dy, patch[0]), (shape_a[1], shape_b[1], dx, patch[1])):
        half = p // 2
        # Centre c needs c - half >= 0 and c - half + p <= size_a; in b, at c - d rounded:
        # c - d - half - margin >= 0 and c - d - half + p + margin <= size_b.
        lo = max(half, int(np.ceil(d)) + half + margin + 1)
        hi = min(size_a - p + half, int(np.floor(d)) + size_b - p + half - margin - 1)
        if hi < lo:
            return np.zeros((0, 0, 2), int)
        count = int(np.floor((hi - lo) / stride)) + 1
        # Spread the points evenly over what is available (both ends covered).
        axes.append(np.unique(np.round(np.linspace(lo, hi, count) if count > 1 else [(lo + hi) / 2]).astype(int)))
    rows, cols = np.meshgrid(axes[0], axes[1], indexing="ij")
    return np.stack([rows, cols], axis=-1)


def _neighbour_median_ok(flow: np.ndarray, valid: np.ndarray, max_deviation: float) -> np.ndarray:
    """Valid vectors within `max_deviation` of the median of the valid vectors in their 3 x 3
    neighbourhood on the grid (themselves included), which must hold at least two."""
    gy, gx, _ = flow.shape
    padded = np.full((gy + 2, gx + 2, 2), np.nan)
    padded[1:-1, 1:-1] = np.where(valid[..., None], flow, np.nan)
    stack = np.stack([padded[i: i + gy, j: j + gx] for i in range(3) for j in range(3)])
    count = np.isfinite(stack[..., 0]).sum(axis=0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neighbourhoods: not valid anyway
        median = np.nanmedian(stack, axis=0)
        deviation = np.hypot(*(flow - median).transpose(2, 0, 1))
    # A single point across a narrow overlap (1 x n grid) still has its neighbours along the seam.
    return valid & (count >= min(2, int(valid.sum()))) & (deviation <= max_deviation)


def flow_stride(shape: tuple[int, int], patch: int, config: ElasticConfig) -> float:
    """Spacing of the flow grid: `stride_px`, or half the mesh spacing but at least a quarter patch."""
    if config.stride_px:
        return float(config.stride_px)
    return max(patch / 4.0, min(shape) / config.mesh_cells / 2.0, 2.0)


def pair_flow(tile_a: np.ndarray, tile_b: np.ndarray, offset: tuple[float, float], config: ElasticConfig,
              min_std: float = 0.0) -> dict:
    """Flow over the overlap of a pair at its rigid `offset` (x, y): {"points": tile-a pixel
    (x, y) of each kept patch centre, "flow": (fx, fy) such that the content is at b's pixel
    u_a - offset + flow, "correlation": peak value}; empty lists when nothing can be measured.
    Patches are `patch_px` square, narrowed across a narrow overlap so that they and their
    search fit in it. `min_std`: a template flatter than this (grey levels) is not matched."""
    empty: dict = {"points": [], "flow": [], "correlation": []}
    r = int(config.search_px)
    overlap = (min(tile_a.shape[0], tile_b.shape[0] + offset[1]) - max(0, offset[1]),
               min(tile_a.shape[1], tile_b.shape[1] + offset[0]) - max(0, offset[0]))
    # At most a quarter tile along the seam, so that the flow resolves how the distortion varies.
    patch = tuple(int(min(config.patch_px, min(tile_a.shape) // 4, np.floor(o) - 2 * r - 2)) for o in overlap)
    if min(patch) < config.min_patch_px:
        return empty
    stride = flow_stride(tile_a.shape, max(patch), config)
    grid = _overlap_grid(tile_a.shape, tile_b.shape, offset, patch, r, stride)
    if grid.size == 0:
        return empty
    centres = grid.reshape(-1, 2)
    half = np.array([patch[0] // 2, patch[1] // 2])
    # b's window centre: where the rigid offset puts a's centre, to the nearest pixel.
    expected = centres - np.array([offset[1], offset[0]])
    window_centres = np.round(expected).astype(int)
    t0 = centres - half
    w0 = window_centres - half - r
    ta = (t0[:, 0, None, None] + np.arange(patch[0])[None, :, None],
          t0[:, 1, None, None] + np.arange(patch[1])[None, None, :])
    wb = (w0[:, 0, None, None] + np.arange(patch[0] + 2 * r)[None, :, None],
          w0[:, 1, None, None] + np.arange(patch[1] + 2 * r)[None, None, :])
    templates, windows = tile_a[ta].astype(np.float64), tile_b[wb].astype(np.float64)
    usable = signal_mask(tile_a[ta]).all(axis=(1, 2)) & signal_mask(tile_b[wb]).all(axis=(1, 2))
    usable &= templates.std(axis=(1, 2)) > max(min_std, 1e-6)
    ncc = patch_ncc(templates, windows)
    n, span = len(centres), 2 * r + 1
    py, px = np.divmod(ncc.reshape(n, -1).argmax(axis=1), span)
    k = np.arange(n)
    peak = ncc[k, py, px]
    interior = (py > 0) & (py < span - 1) & (px > 0) & (px < span - 1)
    usable &= interior & (peak >= config.min_correlation)
    iy, ix = np.clip(py, 1, span - 2), np.clip(px, 1, span - 2)
    sub_y = _parabola(ncc[k, iy - 1, ix], ncc[k, iy, ix], ncc[k, iy + 1, ix])
    sub_x = _parabola(ncc[k, iy, ix - 1], ncc[k, iy, ix], ncc[k, iy, ix + 1])
    # a's patch at t0 matches b at w0 + peak: a's centre c is at b's c - t0 + w0 + peak.
    found_y = centres[:, 0] - t0[:, 0] + w0[:, 0] + py + sub_y
    found_x = centres[:, 1] - t0[:, 1] + w0[:, 1] + px + sub_x
    flow = np.stack([found_x - expected[:, 1], found_y - expected[:, 0]], axis=-1)
    keep = _neighbour_median_ok(flow.reshape(*grid.shape[:2], 2), usable.reshape(grid.shape[:2]),
                                config.max_deviation_px).ravel()
    return {"points": [[float(c[1]), float(c[0])] for c in centres[keep]],
            "flow": [[round(float(f[0]), 4), round(float(f[1]), 4)] for f in flow[keep]],
            "correlation": [round(float(v), 4) for v in peak[keep]]}


# ---------------------------------------------------------------- meshes

def node_spacing(shape: tuple[int, int], cells: int) -> tuple[float, float]:
    """(x, y) spacing of a tile's mesh nodes: `cells` cells over the footprint [-0.5, side - 0.5]."""
    return shape[1] / cells, shape[0] / cells


def _axis_weights(coords: np.ndarray, size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Left node index and fraction towards the next of pixel coordinates on one axis (clamped:
    constant beyond the footprint)."""
    t = np.clip((np.asarray(coords, float) + 0.5) * cells / size, 0, cells)
    i0 = np.minimum(np.floor(t).astype(int), cells - 1)
    return i0, t - i0


def interpolate_mesh(mesh: np.ndarray, shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Bilinear displacement (x, y) of tile pixels `points` [..., 2] (x, y) from a node grid
    [cells + 1, cells + 1, 2] over a tile of `shape` (h, w)."""
    cells = mesh.shape[0] - 1
    points = np.asarray(points, float)
    jx, fx = _axis_weights(points[..., 0], shape[1], cells)
    iy, fy = _axis_weights(points[..., 1], shape[0], cells)
    fx, fy = fx[..., None], fy[..., None]
    return ((1 - fy) * ((1 - fx) * mesh[iy, jx] + fx * mesh[iy, jx + 1])
            + fy * ((1 - fx) * mesh[iy + 1, jx] + fx * mesh[iy + 1, jx + 1]))


def _interpolation_rows(points: np.ndarray, shape: tuple[int, int], cells: int, base: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Column indices [n, 4] and weights [n, 4] of the bilinear map from node unknowns to points."""
    jx, fx = _axis_weights(points[:, 0], shape[1], cells)
    iy, fy = _axis_weights(points[:, 1], shape[0], cells)
    stride = cells + 1
    cols = base + np.stack([iy * stride + jx, iy * stride + jx + 1, (iy + 1) * stride + jx,
                            (iy + 1) * stride + jx + 1], axis=1)
    weights = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], axis=1)
    return cols, weights


def _difference_operators(cells: int, base: int) -> tuple[list, list]:
    """Rows (indices, coefficients) of the first differences between neighbouring nodes and of
    the second differences (along rows, columns, and the mixed one) of one tile's grid."""
    g = cells + 1
    index = base + np.arange(g * g).reshape(g, g)
    first = [(np.stack([index[:, :-1].ravel(), index[:, 1:].ravel()], 1), np.array([-1.0, 1.0])),
             (np.stack([index[:-1, :].ravel(), index[1:, :].ravel()], 1), np.array([-1.0, 1.0]))]
    second = []
    if cells >= 2:
        second += [(np.stack([index[:, :-2].ravel(), index[:, 1:-1].ravel(), index[:, 2:].ravel()], 1),
                    np.array([1.0, -2.0, 1.0])),
                   (np.stack([index[:-2, :].ravel(), index[1:-1, :].ravel(), index[2:, :].ravel()], 1),
                    np.array([1.0, -2.0, 1.0]))]
    # The mixed difference (twist) with weight sqrt(2): the discrete thin-plate energy.
    second.append((np.stack([index[:-1, :-1].ravel(), index[:-1, 1:].ravel(), index[1:, :-1].ravel(),
                             index[1:, 1:].ravel()], 1), np.sqrt(2.0) * np.array([1.0, -1.0, -1.0, 1.0])))
    return first, second


@dataclass
class PairPoints:
    """The flow points of one used pair, ready for the solve: tile a's pixels (x, y), tile b's
    pixels where the same content is, and the displacement difference D_a - D_b they ask for."""

    a: int
    b: int
    points_a: np.ndarray
    points_b: np.ndarray
    target: np.ndarray


def pair_points(a: int, b: int, positions: np.ndarray, offset: Sequence[float], flow: dict) -> PairPoints:
    """The constraints of pair (a, b) measured at rigid `offset` with `flow` (pair_flow's dict),
    for tiles at `positions` [n, 2] (x, y)."""
    points = np.asarray(flow["points"], float).reshape(-1, 2)
    vectors = np.asarray(flow["flow"], float).reshape(-1, 2)
    offset = np.asarray(offset, float)
    points_b = points - offset + vectors
    target = (positions[b] - positions[a]) - offset + vectors
    return PairPoints(a, b, points, points_b, target)


@dataclass
class Relaxed:
    """Node displacements [tiles, cells + 1, cells + 1, 2] (x, y) and, per pair, each point's
    disagreement (px) between the two tiles with the rigid placement and after relaxing, and
    whether the point was kept."""

    meshes: np.ndarray
    rigid_residuals: list[np.ndarray]
    residuals: list[np.ndarray]
    kept: list[np.ndarray]


def _radial_basis(shape: tuple[int, int], cells: int) -> tuple[np.ndarray, np.ndarray]:
    """The radial term d |d|^2 / r^2 at every node (d from the tile's centre, r its half
    diagonal), x and y parts: the first term of a lens's distortion (barrel or pincushion)
    about the optical axis, [nodes, 1] each."""
    h, w = shape
    sx, sy = node_spacing(shape, cells)
    ys, xs = np.meshgrid(-0.5 + sy * np.arange(cells + 1), -0.5 + sx * np.arange(cells + 1), indexing="ij")
    dx, dy = (xs - (w - 1) / 2).ravel(), (ys - (h - 1) / 2).ravel()
    r2 = (dx ** 2 + dy ** 2) / (((h - 1) / 2) ** 2 + ((w - 1) / 2) ** 2)
    return (dx * r2)[:, None], (dy * r2)[:, None]


def relax_meshes(shapes: Sequence[tuple[int, int]], pairs: Sequence[PairPoints], config: ElasticConfig) -> Relaxed:
    """Joint equilibrium of every tile's mesh under the pairs' flow points (see module doc)."""
    cells = config.mesh_cells
    per_tile = (cells + 1) ** 2
    nodes = len(shapes) * per_tile
    kept = [np.ones(len(p.target), bool) for p in pairs]
    # Each pair's points share one unit of weight per mesh cell along its seam, so the balance
    # between flow and springs does not depend on how densely the flow was sampled.
    pair_weight = []
    for p in pairs:
        if len(p.target):
            spacing = np.array(node_spacing(shapes[p.a], cells))
            extent = np.ptp(p.points_a, axis=0) / spacing
            pair_weight.append(max(1.0, float(extent.max()) + 1.0) / len(p.target))
        else:
            pair_weight.append(0.0)
    regulariser, unknowns = _regulariser(shapes, cells, config)
    solution = np.zeros(unknowns)
    for _ in range(3):
        rows, cols, vals, targets, weights = [], [], [], [], []
        row = 0
        for p, keep, w in zip(pairs, kept, pair_weight):
            m = int(keep.sum())
            if not m:
                continue
            ca, wa = _interpolation_rows(p.points_a[keep], shapes[p.a], cells, p.a * per_tile)
            cb, wb = _interpolation_rows(p.points_b[keep], shapes[p.b], cells, p.b * per_tile)
            for component in range(2):  # x unknowns first, then y
                r = np.repeat(np.arange(row, row + m), 4)
                rows += [r, r]
                cols += [ca.ravel() + component * nodes, cb.ravel() + component * nodes]
                vals += [wa.ravel(), -wb.ravel()]
                targets.append(p.target[keep, component])
                weights.append(np.full(m, w))
                row += m
        if row:
            data = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                     shape=(row, unknowns))
            w = sparse.diags(np.concatenate(weights))
            matrix = (data.T @ w @ data + regulariser).tocsc()
            solution = splu(matrix, permc_spec="COLAMD").solve(data.T @ (w @ np.concatenate(targets)))
        displacement = np.stack([solution[:nodes], solution[nodes: 2 * nodes]], axis=1)
        residuals = _pair_residuals(displacement, pairs, shapes, cells, per_tile)
        worse = [keep & (res > config.max_residual_px) for keep, res in zip(kept, residuals)]
        if not any(x.any() for x in worse):
            break
        kept = [keep & ~x for keep, x in zip(kept, worse)]
    meshes = displacement.reshape(len(shapes), cells + 1, cells + 1, 2)
    rigid = [np.hypot(*p.target.T) for p in pairs]
    return Relaxed(meshes, rigid, residuals, kept)


def _regulariser(shapes: Sequence[tuple[int, int]], cells: int, config: ElasticConfig) -> tuple[sparse.spmatrix, int]:
    """The springs' quadratic form over the unknowns [D_x of every node, D_y of every node, the
    radial lens coefficient of every tile (with `radial_lens`)]: stretch and bend act on D minus
    the tile's radial term; the prior pulls every node's D towards 0. Returns (matrix, number
    of unknowns)."""
    per_tile = (cells + 1) ** 2
    nodes = len(shapes) * per_tile
    bases = [_radial_basis(s, cells) for s in shapes] if config.radial_lens else []
    k = 1 if config.radial_lens else 0
    unknowns = 2 * nodes + k * len(shapes)
    rows, cols, vals = [], [], []
    row = 0
    for t in range(len(shapes)):
        first, second = _difference_operators(cells, 0)
        for group, weight in ((first, config.stretch), (second, config.bend)):
            if weight <= 0:
                continue
            scale = np.sqrt(weight)
            for index, coefficients in group:
                m = len(index)
                for component in range(2):
                    r = np.arange(row, row + m)
                    rows.append(np.repeat(r, index.shape[1]))
                    cols.append((index + t * per_tile + component * nodes).ravel())
                    vals.append(np.tile(coefficients * scale, m))
                    if k:
                        # minus the same difference of the radial term: a lens costs nothing
                        shape_rows = -scale * np.einsum("mj,j,mjk->mk", np.ones_like(index, float), coefficients,
                                                        bases[t][component][index])
                        rows.append(np.repeat(r, k))
                        cols.append(np.tile(2 * nodes + t * k + np.arange(k), m))
                        vals.append(shape_rows.ravel())
                    row += m
    operator = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                 shape=(row, unknowns))
    prior = np.concatenate([np.full(2 * nodes, config.prior_weight), np.zeros(k * len(shapes))])
    return (operator.T @ operator + sparse.diags(prior)).tocsr(), unknowns


def _pair_residuals(displacement: np.ndarray, pairs: Sequence[PairPoints], shapes, cells: int, per_tile: int
                    ) -> list[np.ndarray]:
    meshes = displacement.reshape(-1, cells + 1, cells + 1, 2)
    out = []
    for p in pairs:
        if not len(p.target):
            out.append(np.zeros(0))
            continue
        diff = (interpolate_mesh(meshes[p.a], shapes[p.a], p.points_a)
                - interpolate_mesh(meshes[p.b], shapes[p.b], p.points_b) - p.target)
        out.append(np.hypot(*diff.T))
    return out


# ---------------------------------------------------------------- rendering

def _lerp_axis(values: np.ndarray, positions: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `values` along `axis` from sample `positions` (evenly spaced) to
    `coords`, by a small dense interpolation matrix."""
    step = positions[1] - positions[0] if len(positions) > 1 else 1.0
    t = np.clip((coords - positions[0]) / step, 0, len(positions) - 1)
    i0 = np.minimum(np.floor(t).astype(int), max(len(positions) - 2, 0))
    frac = t - i0
    matrix = np.zeros((len(coords), len(positions)))
    matrix[np.arange(len(coords)), i0] = 1 - frac
    if len(positions) > 1:
        matrix[np.arange(len(coords)), i0 + 1] += frac
    return np.moveaxis(np.tensordot(matrix, np.moveaxis(values, axis, 0), axes=1), 0, axis)


def mesh_coordinates(xs: np.ndarray, ys: np.ndarray, position: tuple[float, float], shape: tuple[int, int],
                     mesh: np.ndarray, iterations: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Tile pixel coordinates (rows, cols) [len(ys), len(xs)] shown at the section's pixels
    xs x ys by a tile at `position` (x, y) of `shape` deformed by `mesh`: u with
    position + u + D(u) = P. Solved exactly on a coarse grid of output points (eight per mesh
    cell, fixed to the tile) by fixed-point iteration u <- P - position - D(u), which converges because D changes
    by much less than a pixel per pixel, and interpolated bilinearly in between."""
    # Eight grid points per mesh cell: the inverse of a piecewise bilinear map has kinks where
    # the cells meet, which a coarser grid rounds off (0.2 px at one point per cell for a lens
    # moving the corners by 3 px; 0.014 px at eight).
    sx, sy = (s / 8 for s in node_spacing(shape, mesh.shape[0] - 1))
    # The coarse grid is fixed to the tile, not to the box: neighbouring boxes then interpolate
    # the same values and meet without a step.
    grid_x = position[0] + sx * np.arange(np.floor((xs[0] - position[0]) / sx), np.ceil((xs[-1] - position[0]) / sx) + 2)
    grid_y = position[1] + sy * np.arange(np.floor((ys[0] - position[1]) / sy), np.ceil((ys[-1] - position[1]) / sy) + 2)
    gx, gy = np.meshgrid(grid_x, grid_y)
    points = np.stack([gx - position[0], gy - position[1]], axis=-1)
    u = points.copy()
    for _ in range(iterations):
        u = points - interpolate_mesh(mesh, shape, u)
    inverse = points - u  # D at the tile pixel that lands on each coarse point
    dense = _lerp_axis(_lerp_axis(inverse, grid_y, ys.astype(float), 0), grid_x, xs.astype(float), 1)
    cols = xs[None, :] - position[0] - dense[..., 0]
    rows = ys[:, None] - position[1] - dense[..., 1]
    return rows, cols
