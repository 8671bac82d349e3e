"""One section's montage as two steps whose results are plain JSON-able dicts, so that the queue
stages (services/montage.py) store them between tasks and tests run them in memory:

  measure_section   tile contents and every neighbour pair's offset (match.py);
  solve_section     positions with outlier rejection (solve.py), gain/offset (intensity.py), what
                    happened to each tile and pair, and the summary figures of the report.

`stitch_in_memory` chains them and renders the whole section (render.py), for tests and benches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from exaconnect.montage.intensity import IntensityConfig, solve_intensity
from exaconnect.montage.match import MatchConfig, PairMatch, match_section, tile_content
from exaconnect.montage.render import FALLBACK_WEIGHT, PlacedTile, render_box
from exaconnect.montage.solve import SolveConfig, solve_positions


@dataclass(frozen=True)
class MontageConfig:
    match: MatchConfig = field(default_factory=MatchConfig)
    solve: SolveConfig = field(default_factory=SolveConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MontageConfig":
        from exaconnect.errors import InputError

        unknown = set(data) - {"match", "solve", "intensity"}
        if unknown:
            raise InputError(f"montage config: unknown keys {sorted(unknown)}; expected match, solve, intensity")
        parts = {}
        for key, kind in (("match", MatchConfig), ("solve", SolveConfig), ("intensity", IntensityConfig)):
            values = data.get(key, {})
            allowed = set(kind.__dataclass_fields__)
            if set(values) - allowed:
                raise InputError(f"montage config {key}: unknown keys {sorted(set(values) - allowed)}; "
                                 f"expected some of {sorted(allowed)}")
            parts[key] = kind(**values)
        return cls(**parts)


def measure_section(stage_xy: np.ndarray, shapes: Sequence[tuple[int, int]], read: Callable[[int], np.ndarray],
                    config: MontageConfig = MontageConfig(), progress: Callable | None = None) -> dict:
    """{"tiles": [content of each tile], "pairs": [PairMatch as dict]} for one section."""
    contents: dict[int, dict] = {}

    def read_and_look(i: int) -> np.ndarray:
        pixels = read(i)
        if i not in contents:
            contents[i] = tile_content(pixels, config.match)
        return pixels

    pairs = match_section(np.asarray(stage_xy, float), shapes, read_and_look, config.match, progress=progress)
    for i in range(len(shapes)):
        if i not in contents:  # a tile with no neighbour at all is still looked at, for the report
            read_and_look(i)
    return {"tiles": [contents[i] for i in range(len(shapes))], "pairs": [p.as_dict() for p in pairs]}


def solve_section(stage_xy: np.ndarray, measured: dict, config: MontageConfig = MontageConfig()) -> dict:
    """Positions, gain/offset and the fate of every tile and pair (see module doc)."""
    stage_xy = np.asarray(stage_xy, np.float64).reshape(-1, 2)
    n = len(stage_xy)
    pairs = [PairMatch.from_dict(p) for p in measured["pairs"]]
    contents = measured["tiles"]
    # A pair with a tile that holds no signal cannot be right, whatever its peak says.
    trusted = [k for k, p in enumerate(pairs) if p.trusted
               and contents[p.a]["status"] == "ok" and contents[p.b]["status"] == "ok"]
    solution = solve_positions(stage_xy, [(pairs[k].a, pairs[k].b) for k in trusted],
                               np.array([pairs[k].offset for k in trusted]).reshape(-1, 2), config.solve)
    used = [trusted[i] for i in np.flatnonzero(solution.used)]
    gain, offset = solve_intensity(n, [(pairs[k].a, pairs[k].b) for k in used],
                                   np.array([[pairs[k].mean_a, pairs[k].std_a, pairs[k].mean_b, pairs[k].std_b]
                                             for k in used]).reshape(-1, 4), config.intensity)
    pair_records = []
    fate = {trusted[i]: ("used" if solution.used[i] else "rejected", float(solution.residuals[i]))
            for i in range(len(trusted))}
    for k, p in enumerate(pairs):
        status, residual = fate.get(k, ("untrusted", float("nan")))
        reason = p.reason if status == "untrusted" and p.reason != "ok" else (
            "a tile holds no signal" if status == "untrusted" else
            f"outlier: residual {residual:.1f} px" if status == "rejected" else "ok")
        pair_records.append({"a": p.a, "b": p.b, "status": status, "reason": reason, "residual_px": residual,
                             "offset": p.offset, "nominal": p.nominal, "correlation": p.correlation})
    unplaced = set(solution.unplaced)
    tiles = []
    for i in range(n):
        mine = [r for r in pair_records if i in (r["a"], r["b"])]
        if i not in unplaced:
            status, reason = "placed", f"{sum(r['status'] == 'used' for r in mine)} pairs"
        elif contents[i]["status"] != "ok":
            status, reason = "stage position", f"tile is {contents[i]['status']}"
        elif not mine:
            status, reason = "stage position", "no neighbour within the search range"
        else:
            status = "stage position"
            reason = "; ".join(f"pair with {r['b'] if r['a'] == i else r['a']}: {r['reason']}" for r in mine)
        tiles.append({"index": i, "status": status, "reason": reason, "content": contents[i]["status"],
                      "x": float(solution.positions[i, 0]), "y": float(solution.positions[i, 1]),
                      "stage_x": float(stage_xy[i, 0]), "stage_y": float(stage_xy[i, 1]),
                      "gain": float(gain[i]), "offset": float(offset[i]), "group": int(solution.groups[i])})
    used_residuals = [r["residual_px"] for r in pair_records if r["status"] == "used"]
    summary = {
        "tiles": n,
        "tiles_placed": n - len(unplaced),
        "tiles_at_stage_position": sorted(unplaced),
        "pairs": len(pairs),
        "pairs_used": len(used),
        "pairs_rejected": len(trusted) - len(used),
        "pairs_untrusted": len(pairs) - len(trusted),
        "seam_residual_median_px": float(np.median(used_residuals)) if used_residuals else None,
        "seam_residual_max_px": float(np.max(used_residuals)) if used_residuals else None,
        "groups": len({int(solution.groups[i]) for i in range(n) if i not in unplaced}),
    }
    return {"summary": summary, "tiles": tiles, "pairs": pair_records}


def placed_tiles(solved: dict, pixels: dict[int, np.ndarray]) -> list[PlacedTile]:
    """The tiles of `pixels` (index -> array) at their solved positions, for render_box."""
    out = []
    for i, array in pixels.items():
        t = solved["tiles"][i]
        weight = 1.0 if t["content"] == "ok" else FALLBACK_WEIGHT
        out.append(PlacedTile(array, t["x"], t["y"], t["gain"], t["offset"], weight))
    return out


def section_bounds(solved: dict, shapes: Sequence[tuple[int, int]]) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) of the pixels at least half covered by the placed tiles."""
    x0 = min(t["x"] for t in solved["tiles"])
    y0 = min(t["y"] for t in solved["tiles"])
    x1 = max(t["x"] + w for t, (h, w) in zip(solved["tiles"], shapes))
    y1 = max(t["y"] + h for t, (h, w) in zip(solved["tiles"], shapes))
    return int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))


def stitch_in_memory(tiles: Sequence[np.ndarray], stage_xy: np.ndarray, config: MontageConfig = MontageConfig(),
                     box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, dict, tuple[int, int, int, int]]:
    """Measure, solve and render a section held in memory: (image, solved, box rendered)."""
    shapes = [t.shape for t in tiles]
    measured = measure_section(stage_xy, shapes, lambda i: tiles[i], config)
    solved = solve_section(stage_xy, measured, config)
    box = box or section_bounds(solved, shapes)
    image = render_box(box, placed_tiles(solved, dict(enumerate(tiles))), tiles[0].dtype)
    return image, solved, box
