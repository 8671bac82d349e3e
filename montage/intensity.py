"""Per-tile gain and offset that make neighbours agree in their overlaps.

A tile's corrected value is gain * value + offset. Over the shared pixels of each used pair the
corrected spreads should agree (gain_a * std_a = gain_b * std_b, solved in log gain) and then the
corrected means (gain_a * mean_a + offset_a = gain_b * mean_b + offset_b). Both are graph least
squares like the positions (solve.solve_graph), with a weak pull to gain 1 and offset 0, so each
connected group keeps its average brightness and a tile without pairs is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exaconnect.montage.solve import solve_graph


@dataclass(frozen=True)
class IntensityConfig:
    enabled: bool = True
    prior_weight: float = 1e-3
    # Overlaps flatter than this (std, grey levels) say nothing about gain.
    min_std: float = 1.0


def solve_intensity(n: int, pairs: list[tuple[int, int]], stats: np.ndarray,
                    config: IntensityConfig = IntensityConfig()) -> tuple[np.ndarray, np.ndarray]:
    """(gain, offset) per tile from `stats[k]` = (mean_a, std_a, mean_b, std_b) of used pair k."""
    gain, offset = np.ones(n), np.zeros(n)
    edges = np.asarray(pairs, int).reshape(-1, 2)
    stats = np.asarray(stats, np.float64).reshape(-1, 4)
    good = np.all(np.isfinite(stats), axis=1) & (stats[:, 1] >= config.min_std) & (stats[:, 3] >= config.min_std)
    if not config.enabled or not good.any():
        return gain, offset
    edges, stats = edges[good], stats[good]
    mean_a, std_a, mean_b, std_b = stats.T
    log_gain = solve_graph(n, edges, np.log(std_a) - np.log(std_b), np.zeros(n), config.prior_weight)[:, 0]
    gain = np.exp(log_gain)
    target = gain[edges[:, 0]] * mean_a - gain[edges[:, 1]] * mean_b
    offset = solve_graph(n, edges, target, np.zeros(n), config.prior_weight)[:, 0]
    return gain, offset
