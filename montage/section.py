"""One section's montage as two steps whose results are plain JSON-able dicts, so that the queue
stages (services/montage.py) store them between tasks and tests run them in memory:

  measure_section   tile contents, every neighbour pair's offset (match.py) and, for trusted
                    pairs, the flow over their overlap (elastic.py), while both tiles are read;
  solve_section     positions with outlier rejection (solve.py), gain/offset (intensity.py), one
                    relaxed mesh per tile (elastic.py), what happened to each tile and pair, and
                    the summary figures of the report.

`stitch_in_memory` chains them and renders the whole section (render.py), for tests and benches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from exaconnect.montage.elastic import ElasticConfig, PairPoints, pair_flow, pair_points, relax_meshes
from exaconnect.montage.intensity import IntensityConfig, solve_intensity
from exaconnect.montage.match import MatchConfig, PairMatch, match_pair, neighbour_pairs, tile_content
from exaconnect.montage.render import FALLBACK_WEIGHT, PlacedTile, render_box
from exaconnect.montage.solve import SolveConfig, solve_positions


@dataclass(frozen=True)
class MontageConfig:
    match: MatchConfig = field(default_factory=MatchConfig)
    solve: SolveConfig = field(default_factory=SolveConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MontageConfig":
        from exaconnect.precomputed.config_loader import load_dataclass

        return load_dataclass(cls, data, "montage")


def measure_section(stage_xy: np.ndarray, shapes: Sequence[tuple[int, int]], read: Callable[[int], np.ndarray],
                    config: MontageConfig = MontageConfig(), progress: Callable | None = None,
                    cache_tiles: int = 16) -> dict:
    """{"tiles": [content of each tile], "pairs": [PairMatch as dict], "flows": [pair_flow's dict
    for each trusted pair, None for the others or with elastic refinement off], "shapes": [(h, w)
    of each tile]} for one section.
    At most `cache_tiles` tiles are held at once; pairs go in order of their first tile, so a
    row-major layout with fewer tiles per row is read about once."""
    stage_xy = np.asarray(stage_xy, float).reshape(-1, 2)
    contents: dict[int, dict] = {}
    cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def tile(i: int) -> np.ndarray:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        cache[i] = read(i)
        if i not in contents:
            contents[i] = tile_content(cache[i], config.match)
        while len(cache) > max(2, cache_tiles):
            cache.popitem(last=False)
        return cache[i]

    neighbours = neighbour_pairs(stage_xy, shapes, config.match)
    pairs, flows = [], []
    for i, j in neighbours if progress is None else progress(neighbours):
        a, b = tile(i), tile(j)
        pair = match_pair(a, b, tuple(stage_xy[j] - stage_xy[i]), config.match, i, j)
        pairs.append(pair.as_dict())
        flow = None
        if config.elastic.enabled and pair.trusted:
            top = float(np.iinfo(a.dtype).max) if a.dtype.kind in "ui" else 1.0
            flow = pair_flow(a, b, pair.offset, config.elastic, min_std=config.match.min_std_fraction * top)
        flows.append(flow)
    for i in range(len(shapes)):
        if i not in contents:  # a tile with no neighbour at all is still looked at, for the report
            tile(i)
    return {"tiles": [contents[i] for i in range(len(shapes))], "pairs": pairs, "flows": flows,
            "shapes": [[int(h), int(w)] for h, w in shapes]}


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
    if config.elastic.enabled and measured.get("flows") and measured.get("shapes"):
        shapes = [tuple(s) for s in measured["shapes"]]
        elastic = relax_section(solution.positions, shapes, pairs, used, measured["flows"], unplaced, config.elastic)
        for record, mesh in zip(tiles, elastic.pop("meshes")):
            record["mesh"] = mesh
    else:
        elastic = None
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
    if elastic is not None:
        summary["elastic"] = elastic
    return {"summary": summary, "tiles": tiles, "pairs": pair_records}


def _stats(values: np.ndarray, prefix: str) -> dict:
    if not len(values):
        return {f"{prefix}median_px": None, f"{prefix}p95_px": None, f"{prefix}max_px": None}
    return {f"{prefix}median_px": float(np.median(values)), f"{prefix}p95_px": float(np.percentile(values, 95)),
            f"{prefix}max_px": float(np.max(values))}


def relax_section(positions: np.ndarray, shapes: Sequence[tuple[int, int]], pairs: Sequence[PairMatch],
                  used: Sequence[int], flows: Sequence[dict | None], unplaced: set[int],
                  config: ElasticConfig) -> dict:
    """Meshes of every tile (None for a tile left at its stage position) from the flows of the
    used pairs, and the seam figures: each flow point's disagreement between its two tiles with
    the rigid placement and after relaxing (px). A used pair without flow points (an overlap too
    narrow for patches) holds its tiles by its rigid offset at the overlap's centre."""
    constraints: list[PairPoints] = []
    for k in used:
        p = pairs[k]
        flow = flows[k] if k < len(flows) and flows[k] else None
        if not flow or not flow["points"]:
            (ha, wa), (hb, wb) = shapes[p.a], shapes[p.b]
            dx, dy = p.offset
            centre = [(max(0.0, dx) + min(wa, dx + wb)) / 2 - 0.5, (max(0.0, dy) + min(ha, dy + hb)) / 2 - 0.5]
            flow = {"points": [centre], "flow": [[0.0, 0.0]]}
        constraints.append(pair_points(p.a, p.b, positions, p.offset, flow))
    relaxed = relax_meshes(shapes, constraints, config)
    rigid = np.concatenate([r[k] for r, k in zip(relaxed.rigid_residuals, relaxed.kept)] or [np.zeros(0)])
    after = np.concatenate([r[k] for r, k in zip(relaxed.residuals, relaxed.kept)] or [np.zeros(0)])
    meshes = []
    for i, mesh in enumerate(relaxed.meshes):
        meshes.append(None if i in unplaced else {"dx": np.round(mesh[..., 0], 3).tolist(),
                                                  "dy": np.round(mesh[..., 1], 3).tolist()})
    points = sum(len(c.target) for c in constraints)
    kept = int(sum(k.sum() for k in relaxed.kept))
    return {"meshes": meshes, "points": points, "points_dropped": points - kept,
            "pairs_without_flow": sum(1 for k in used if not (k < len(flows) and flows[k] and flows[k]["points"])),
            **_stats(rigid, "rigid_"), **_stats(after, ""),
            "max_displacement_px": float(np.abs(relaxed.meshes).max()) if len(relaxed.meshes) else 0.0}


def placed_tiles(solved: dict, pixels: dict[int, np.ndarray]) -> list[PlacedTile]:
    """The tiles of `pixels` (index -> array) at their solved positions, for render_box."""
    out = []
    for i, array in pixels.items():
        t = solved["tiles"][i]
        weight = 1.0 if t["content"] == "ok" else FALLBACK_WEIGHT
        out.append(PlacedTile(array, t["x"], t["y"], t["gain"], t["offset"], weight, tile_mesh(t)))
    return out


def tile_mesh(record: dict) -> np.ndarray | None:
    """A solved tile's mesh displacements [cells + 1, cells + 1, 2] (x, y), or None (rigid)."""
    mesh = record.get("mesh")
    if not mesh:
        return None
    return np.stack([np.asarray(mesh["dx"], float), np.asarray(mesh["dy"], float)], axis=-1)


def tile_margins(solved: dict) -> list[float]:
    """How far (px) each solved tile's mesh moves any of its pixels from its rigid footprint."""
    out = []
    for t in solved["tiles"]:
        mesh = tile_mesh(t)
        out.append(0.0 if mesh is None else float(np.abs(mesh).max()))
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
