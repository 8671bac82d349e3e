"""Global tile positions of one section from the pairwise offsets, with outlier rejection.

Least squares over all trusted pairs: minimise sum_k w_k |p_b - p_a - d_k|^2 + eps sum_i |p_i - s_i|^2,
where s are the stage positions. The small `eps` term fixes what the pairs cannot: each
connected group of tiles keeps the mean of its stage positions, and a tile without any trusted
pair stays at its stage position. Outliers: while the largest residual exceeds
`max_residual_px`, that one pair is dropped and the system solved again. One pair at a time,
because a bad pair spreads part of its error over the good pairs of every loop it closes; its own
residual stays the largest, so dropping only the worst never drops a good pair for a bad one's sake.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import factorized

from exaconnect.errors import InputError


@dataclass(frozen=True)
class SolveConfig:
    max_residual_px: float = 2.0
    # Weight of the pull towards the stage position relative to one pair (see module doc).
    stage_weight: float = 1e-4

    def __post_init__(self) -> None:
        if not self.max_residual_px > 0:
            raise InputError(f"montage max_residual_px {self.max_residual_px}: expected > 0")
        if not 0 < self.stage_weight < 1:
            raise InputError(f"montage stage_weight {self.stage_weight}: expected in (0, 1)")


@dataclass
class Solution:
    """Positions (x, y) of every tile; for each input pair its residual (px, NaN if not used) and
    whether it was used; the pairs dropped as outliers in order; tiles left without a used pair
    (placed at their stage position); the connected group of each tile."""

    positions: np.ndarray
    residuals: np.ndarray
    used: np.ndarray
    rejected: list[int] = field(default_factory=list)
    unplaced: list[int] = field(default_factory=list)
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, int))


def solve_graph(n: int, edges: np.ndarray, targets: np.ndarray, prior: np.ndarray, prior_weight: float,
                weights: np.ndarray | None = None) -> np.ndarray:
    """argmin_v sum_k w_k |v_b - v_a - t_k|^2 + prior_weight sum_i |v_i - prior_i|^2 for edges (a, b);
    `targets` and `prior` may have several columns (solved together)."""
    prior = prior.reshape(n, -1)
    # No edge (no trusted pair at all, or every pair rejected): the prior alone decides.
    targets = targets.reshape(len(edges), prior.shape[1])
    weights = np.ones(len(edges)) if weights is None else np.asarray(weights, float)
    a, b = (edges[:, 0], edges[:, 1]) if len(edges) else (np.zeros(0, int), np.zeros(0, int))
    # Normal equations of the difference operator: a weighted graph Laplacian plus the prior.
    rows = np.concatenate([a, b, a, b, np.arange(n)])
    cols = np.concatenate([a, b, b, a, np.arange(n)])
    vals = np.concatenate([weights, weights, -weights, -weights, np.full(n, prior_weight)])
    matrix = sparse.csc_matrix((vals, (rows, cols)), shape=(n, n))
    rhs = prior_weight * prior.astype(np.float64)
    np.add.at(rhs, b, weights[:, None] * targets)
    np.add.at(rhs, a, -weights[:, None] * targets)
    solve = factorized(matrix)
    return np.stack([solve(rhs[:, c]) for c in range(rhs.shape[1])], axis=1)


def solve_positions(stage_xy: np.ndarray, pairs: list[tuple[int, int]], offsets: np.ndarray,
                    config: SolveConfig = SolveConfig()) -> Solution:
    """Tile positions from `offsets[k]` = measured p_b - p_a (x, y) of trusted `pairs[k]` = (a, b)."""
    stage_xy = np.asarray(stage_xy, np.float64).reshape(-1, 2)
    n = len(stage_xy)
    edges = np.asarray(pairs, int).reshape(-1, 2)
    offsets = np.asarray(offsets, np.float64).reshape(-1, 2)
    used = np.ones(len(edges), bool)
    rejected: list[int] = []
    while True:
        active = np.flatnonzero(used)
        positions = solve_graph(n, edges[active], offsets[active], stage_xy, config.stage_weight)
        residuals = np.full(len(edges), np.nan)
        if len(active):
            predicted = positions[edges[active, 1]] - positions[edges[active, 0]]
            residuals[active] = np.hypot(*(predicted - offsets[active]).T)
        if not len(active) or np.nanmax(residuals) <= config.max_residual_px:
            break
        worst = int(np.nanargmax(residuals))
        used[worst] = False
        rejected.append(worst)
    # Residuals of rejected pairs against the final positions, for the report.
    if len(edges):
        final = np.hypot(*(positions[edges[:, 1]] - positions[edges[:, 0]] - offsets).T)
        residuals = np.where(used, residuals, final)
    active = edges[used]
    linked = np.zeros(n, bool)
    linked[active.ravel()] = True
    graph = sparse.coo_matrix((np.ones(len(active)), (active[:, 0], active[:, 1])), shape=(n, n)) if len(active) \
        else sparse.coo_matrix((n, n))
    _, groups = connected_components(graph, directed=False)
    return Solution(positions, residuals, used, rejected, [int(i) for i in np.flatnonzero(~linked)], groups)
