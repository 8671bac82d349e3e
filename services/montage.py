"""Montage: stitch the overlapping tiles of each section into one image layer, in five stages.

  1. match   one task per section: tile contents and every neighbour pair's offset
             (`montage/match/ZZZZZ.json`);
  2. solve   one task per section: positions with outlier rejection, gain/offset, the fate of
             each tile and pair (`montage/solve/ZZZZZ.json`);
  3. render  one task per chunk-aligned box of the image layer (created when the stage starts,
             over the union of the solved sections), reading only the tiles that touch the box,
             one section at a time;
  4. report  one task per section: `montage/report/ZZZZZ.json` and a PNG of the seams' residuals;
  5. outlines one task per section: the tile outlines as a precomputed annotation layer beside
             the image (`LAYER/tile_outlines`), shown in the run's neuroglancer link.

The manifest is read and checked whole when the match stage starts, before anything is written;
the checked tile set (absolute paths, sizes) and the configuration are stored once under the
layer (`montage/tiles.json`, `montage/config.json`) and every task reads them from there. All
files go through the run store (`.done` markers), so a rerun of any task rewrites the same bytes.
Layer coordinates are the tiles' pixel frame: a tile at stage position (x, y) lands at voxel
(x, y) give or take its correction, and section z at voxel z.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from taskqueue import RegisteredTask

from exaconnect.errors import InputError, LayerError
from exaconnect.montage.manifest import ManifestRules, TileSet, read_manifest, read_tile
from exaconnect.montage.render import render_box, tiles_touching
from exaconnect.montage.report import seam_figure
from exaconnect.montage.section import (MontageConfig, measure_section, placed_tiles, section_bounds,
                                        solve_section, tile_margins)
from exaconnect.precomputed.bbox import Box, Triple, chunk_grid, parse_resolution, parse_triple
from exaconnect.precomputed.layers import (LayerSpec, LayerUrl, Provenance, create_layer, layer_url, open_layer,
                                           write_box)
from exaconnect.precomputed.store import ArtifactStore
from exaconnect.precomputed.verify import record_checksums
from exaconnect.services.stages import Stage, StageCommand, layer_argument, register_command

MONTAGE_DIR = "montage"


def _key(kind: str, z: int, suffix: str = "json") -> str:
    return f"{MONTAGE_DIR}/{kind}/{z:05d}.{suffix}"


def load_tile_set(layer: str) -> TileSet:
    raw = ArtifactStore(layer).get(f"{MONTAGE_DIR}/tiles.json")
    if raw is None:
        raise LayerError(f"layer {layer}: no {MONTAGE_DIR}/tiles.json; run the montage match stage first")
    return TileSet.from_dict(json.loads(raw))


def load_config(layer: str) -> MontageConfig:
    raw = ArtifactStore(layer).get(f"{MONTAGE_DIR}/config.json")
    if raw is None:
        raise LayerError(f"layer {layer}: no {MONTAGE_DIR}/config.json; run the montage match stage first")
    return MontageConfig.from_dict(json.loads(raw))


def load_section(layer: str, kind: str, z: int) -> dict:
    data = ArtifactStore(layer).get_json(_key(kind, z))
    if data is None:
        raise LayerError(f"layer {layer}: {_key(kind, z)} is not complete; run the montage {kind} stage first")
    return data


def _section_geometry(tiles: TileSet, z: int) -> tuple[list, np.ndarray, list[tuple[int, int]]]:
    section = tiles.section(z)
    return section, np.array([[t.x, t.y] for t in section], float).reshape(-1, 2), [(t.height, t.width) for t in section]


# ---------------------------------------------------------------- stage 1: match

class MontageMatchTask(RegisteredTask):
    """Tile contents and neighbour offsets of one section."""

    def __init__(self, layer: str, z: int):
        super().__init__(layer, z)

    def execute(self) -> None:
        tiles, config = load_tile_set(self.layer), load_config(self.layer)
        section, stage_xy, shapes = _section_geometry(tiles, int(self.z))
        measured = measure_section(stage_xy, shapes, lambda i: read_tile(section[i].path), config)
        ArtifactStore(self.layer).put_json(_key("match", int(self.z)), measured)


def create_montage_match_tasks(tiles: str, layer: str, config: MontageConfig = MontageConfig(),
                               rules: ManifestRules = ManifestRules()) -> list[MontageMatchTask]:
    """Check the whole manifest `tiles` (InputError naming the tile otherwise), store the checked
    tile set and the configuration under `layer`, and return one match task per section."""
    tile_set = read_manifest(tiles, rules)
    url = layer_url(layer)
    store = ArtifactStore(url)
    store.put_json(f"{MONTAGE_DIR}/config.json", config.as_dict())
    store.put_json(f"{MONTAGE_DIR}/tiles.json", tile_set.as_dict())
    return [MontageMatchTask(url, z) for z in tile_set.sections if tile_set.section(z)]


# ---------------------------------------------------------------- stage 2: solve

class MontageSolveTask(RegisteredTask):
    """Positions, gain/offset and the fate of each tile and pair of one section."""

    def __init__(self, layer: str, z: int):
        super().__init__(layer, z)

    def execute(self) -> None:
        z = int(self.z)
        tiles, config = load_tile_set(self.layer), load_config(self.layer)
        section, stage_xy, _ = _section_geometry(tiles, z)
        solved = solve_section(stage_xy, load_section(self.layer, "match", z), config)
        for record, tile in zip(solved["tiles"], section):
            record["tile"], record["path"] = tile.name, tile.path
        solved["skipped"] = [s for s in tiles.skipped if int(s["z"]) == z]
        solved["summary"]["tiles_skipped"] = len(solved["skipped"])
        ArtifactStore(self.layer).put_json(_key("solve", z), solved)


def _sections(layer: str) -> list[int]:
    tiles = load_tile_set(layer)
    return [z for z in tiles.sections if tiles.section(z)]


def _require(layer: str, kind: str, sections: list[int]) -> None:
    store = ArtifactStore(layer)
    missing = [z for z in sections if not store.is_complete(_key(kind, z))]
    if missing:
        raise LayerError(f"layer {layer}: montage {kind} results missing for sections {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; run the montage {kind} stage first")


def create_montage_solve_tasks(layer: str) -> list[MontageSolveTask]:
    layer = layer_url(layer)
    sections = _sections(layer)
    _require(layer, "match", sections)
    return [MontageSolveTask(layer, z) for z in sections]


# ---------------------------------------------------------------- stage 3: render

class MontageRenderTask(RegisteredTask):
    """One chunk-aligned box of the image layer, from only the tiles that touch it."""

    def __init__(self, layer: str, box: list[int]):
        super().__init__(layer, box)

    def execute(self) -> None:
        box = Box.from_list(self.box)
        vol = open_layer(self.layer)
        tiles = load_tile_set(self.layer)
        store = ArtifactStore(self.layer)
        out = np.zeros(tuple(reversed(box.shape)), dtype=np.dtype(tiles.dtype))
        xy = (box.start[0], box.start[1], box.stop[0], box.stop[1])
        for k, z in enumerate(range(box.start[2], box.stop[2])):
            solved = store.get_json(_key("solve", z))
            if solved is None:  # a z without tiles (allowed gaps) stays empty
                continue
            shapes = [(t.height, t.width) for t in tiles.section(z)]
            positions = np.array([[t["x"], t["y"]] for t in solved["tiles"]], float).reshape(-1, 2)
            # A tile with a relaxed mesh may reach a little beyond its rigid footprint.
            touching = tiles_touching(xy, positions, shapes, tile_margins(solved))
            # One section's touching tiles at a time: a section is never held whole.
            pixels = {i: read_tile(solved["tiles"][i]["path"]) for i in touching}
            out[k] = render_box(xy, placed_tiles(solved, pixels), out.dtype)
        write_box(vol, box, out)
        record_checksums(vol, box)


def montage_bounds(layer: str) -> Box:
    """The box of the layer: the union of every solved section's placed tiles, in z the sections."""
    tiles = load_tile_set(layer)
    sections = _sections(layer)
    _require(layer, "solve", sections)
    boxes = []
    for z in sections:
        solved = load_section(layer, "solve", z)
        boxes.append(section_bounds(solved, [(t.height, t.width) for t in tiles.section(z)]))
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    return Box((x0, y0, min(sections)), (x1, y1, max(sections) + 1))


def create_montage_render_tasks(layer: str, resolution: tuple[float, float, float],
                                chunk_size: Triple = (256, 256, 16), task_shape: Triple | None = None,
                                encoding: str | None = None, overwrite: bool = False) -> list[MontageRenderTask]:
    """Create the image layer over `montage_bounds` and return one task per chunk-aligned box
    (`task_shape`, default 4 x 4 chunks in x and y, one chunk deep)."""
    url = layer_url(layer)
    bounds = montage_bounds(url)
    tiles = load_tile_set(url)
    spec = LayerSpec("image", tiles.dtype, bounds.shape, tuple(resolution), bounds.start, tuple(chunk_size), encoding)
    create_layer(url, spec, Provenance("montage", {"manifest": tiles.manifest, "config": load_config(url).as_dict()},
                                       [tiles.manifest]), overwrite=overwrite)
    shape = task_shape or (chunk_size[0] * 4, chunk_size[1] * 4, chunk_size[2])
    return [MontageRenderTask(url, cell.write.to_list()) for cell in chunk_grid(bounds, shape, align_to=chunk_size)]


# ---------------------------------------------------------------- stage 4: report

class MontageReportTask(RegisteredTask):
    """What happened to one section: summary figures, every tile not placed by its pairs and
    why, every pair not used and why, the skipped tiles; and the seams as a PNG."""

    def __init__(self, layer: str, z: int):
        super().__init__(layer, z)

    def execute(self) -> None:
        z = int(self.z)
        solved = load_section(self.layer, "solve", z)
        shapes = [(t.height, t.width) for t in load_tile_set(self.layer).section(z)]
        store = ArtifactStore(self.layer)
        png = _key("report", z, "png")
        store.put(png, seam_figure(solved, shapes, title=f"z={z}"))
        report = {
            "z": z, **solved["summary"],
            "tiles_not_placed": [{k: t[k] for k in ("index", "tile", "path", "reason", "content")}
                                 for t in solved["tiles"] if t["status"] != "placed"],
            "tiles_skipped": solved.get("skipped", []),
            "pairs_not_used": [{k: p[k] for k in ("a", "b", "status", "reason")}
                               for p in solved["pairs"] if p["status"] != "used"],
            "png": store.where(png),
        }
        store.put_json(_key("report", z), report)


def create_montage_report_tasks(layer: str) -> list[MontageReportTask]:
    layer = layer_url(layer)
    sections = _sections(layer)
    _require(layer, "solve", sections)
    return [MontageReportTask(layer, z) for z in sections]


def load_report(layer: str, z: int) -> dict:
    return load_section(layer, "report", z)


# ---------------------------------------------------------------- the stages

@dataclass(frozen=True)
class MontageMatch(Stage):
    """Pairwise offsets of overlapping neighbour tiles, one task per section."""

    service: ClassVar[str] = "montage"
    stage_name: ClassVar[str] = "montage.match"
    description: ClassVar[str] = "montage: neighbour tile offsets"
    lease_seconds: ClassVar[int] = 1800
    tiles: str
    layer: LayerUrl
    config: MontageConfig = MontageConfig()
    rules: ManifestRules = ManifestRules()

    def __post_init__(self) -> None:
        super().__post_init__()
        # Workers may start elsewhere (a pod, a PBS job): the manifest is stored absolute.
        object.__setattr__(self, "tiles", os.path.abspath(os.path.expanduser(str(self.tiles))))

    def make_tasks(self) -> list:
        return create_montage_match_tasks(self.tiles, self.layer, self.config, self.rules)

    def reads(self) -> tuple[str, ...]:
        return (self.tiles,)

    def writes(self) -> tuple[str, ...]:
        return (f"{self.layer}/{MONTAGE_DIR}/match",)


@dataclass(frozen=True)
class MontageSolve(Stage):
    """Tile positions with outlier rejection and gain/offset, one task per section."""

    service: ClassVar[str] = "montage"
    stage_name: ClassVar[str] = "montage.solve"
    description: ClassVar[str] = "montage: tile positions and intensities"
    match: MontageMatch

    def requires(self) -> tuple[Stage, ...]:
        return (self.match,)

    def make_tasks(self) -> list:
        return create_montage_solve_tasks(self.match.layer)

    def reads(self) -> tuple[str, ...]:
        return (f"{self.match.layer}/{MONTAGE_DIR}/match",)

    def writes(self) -> tuple[str, ...]:
        return (f"{self.match.layer}/{MONTAGE_DIR}/solve",)


@dataclass(frozen=True)
class MontageRender(Stage):
    """The image layer (created when the stage starts), one task per chunk-aligned box."""

    service: ClassVar[str] = "montage"
    stage_name: ClassVar[str] = "montage.render"
    description: ClassVar[str] = "montage: stitched image layer"
    lease_seconds: ClassVar[int] = 900
    solve: MontageSolve
    resolution: tuple[float, float, float]
    chunk_size: Triple = (256, 256, 16)
    encoding: str | None = None

    def requires(self) -> tuple[Stage, ...]:
        return (self.solve,)

    def make_tasks(self) -> list:
        return create_montage_render_tasks(self.solve.match.layer, self.resolution, self.chunk_size,
                                           encoding=self.encoding)

    def reads(self) -> tuple[str, ...]:
        return (self.solve.match.tiles, f"{self.solve.match.layer}/{MONTAGE_DIR}/solve")

    def writes(self) -> tuple[str, ...]:
        return (self.solve.match.layer,)


@dataclass(frozen=True)
class MontageReport(Stage):
    """Per-section report JSON and seam PNG, one task per section."""

    service: ClassVar[str] = "montage"
    stage_name: ClassVar[str] = "montage.report"
    description: ClassVar[str] = "montage: per-section report"
    render: MontageRender

    def requires(self) -> tuple[Stage, ...]:
        return (self.render,)

    def make_tasks(self) -> list:
        return create_montage_report_tasks(self.render.solve.match.layer)

    def reads(self) -> tuple[str, ...]:
        return (f"{self.render.solve.match.layer}/{MONTAGE_DIR}/solve",)

    def writes(self) -> tuple[str, ...]:
        return (f"{self.render.solve.match.layer}/{MONTAGE_DIR}/report",)


def montage_stages(tiles: str, layer: str, resolution: tuple[float, float, float],
                   config: MontageConfig = MontageConfig(), rules: ManifestRules = ManifestRules(),
                   chunk_size: Triple = (256, 256, 16), encoding: str | None = None,
                   upstream: tuple[Stage, ...] = ()) -> list[Stage]:
    """match -> solve -> render -> report for the tile manifest `tiles` into the image layer
    `layer`; `upstream`: stages that must be complete before the match (usually none)."""
    match = MontageMatch(tiles, layer, config, rules, upstream=tuple(upstream))
    solve = MontageSolve(match)
    render = MontageRender(solve, tuple(float(r) for r in resolution), tuple(int(c) for c in chunk_size), encoding)
    report = MontageReport(render)
    return [match, solve, render, report, MontageOutlines(report)]


def _add_arguments(v) -> None:
    v.add_argument("tiles", help="tile manifest: a CSV with the header z,path,x,y (paths relative to it), or a "
                                 "render-ws tile-spec JSON list")
    v.add_argument("layer", type=layer_argument, help="the stitched image layer to write (path or URL)")
    v.add_argument("--resolution", required=True, help="X,Y,Z voxel size in nm")
    v.add_argument("--chunk-size", default="256,256,16", help="X,Y,Z chunk size of the layer")
    v.add_argument("--encoding", default=None, help="raw|jpeg")
    v.add_argument("--skip-missing-tiles", action="store_true",
                   help="leave out (and report) tiles whose files are missing or unreadable instead of refusing the set")
    v.add_argument("--allow-mixed-sizes", action="store_true", help="tiles of different sizes in one set")
    v.add_argument("--allow-missing-sections", action="store_true", help="gaps in z")
    v.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a montage option (YAML value), e.g. --set match.search_px=80 (sections: match, "
                        "solve, intensity, elastic)")


def _config_from_sets(items: list[str]) -> MontageConfig:
    import yaml

    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise InputError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. match.search_px=80")
        options[key.strip()] = yaml.safe_load(value)
    return montage_config(options, "--set")


def montage_config(options: dict, where: str = "montage.set") -> MontageConfig:
    """The default MontageConfig with `section.option: value` overrides (sections: match, solve,
    intensity, elastic), checked by the strict loader."""
    merged = MontageConfig().as_dict()
    for key, value in options.items():
        section, dot, option = str(key).partition(".")
        if not dot or not isinstance(merged.get(section), dict):
            raise InputError(f"{where} {key}: expected SECTION.OPTION with a section of "
                             f"{sorted(k for k, v in merged.items() if isinstance(v, dict))}")
        merged[section][option] = value
    return MontageConfig.from_dict(merged)


def _stages(args) -> list[Stage]:
    rules = ManifestRules(skip_missing_tiles=args.skip_missing_tiles, allow_mixed_sizes=args.allow_mixed_sizes,
                          allow_missing_sections=args.allow_missing_sections)
    return montage_stages(os.path.abspath(args.tiles), args.layer, parse_resolution(args.resolution),
                          _config_from_sets(args.set), rules, parse_triple(args.chunk_size, "--chunk-size"),
                          args.encoding)


register_command(StageCommand("montage", "stitch the tiles of each section into one image (match, solve, render, "
                                         "report, outlines)", _add_arguments, _stages,
                              ("match", "solve", "render", "report", "outlines")))


def write_synthetic_tiles(stack_zyx: np.ndarray, folder: str, tile_size: int = 56, overlap: int = 16,
                          stage_error_px: float = 8.0, seed: int = 0) -> str:
    """The sections of `stack_zyx` cut into overlapping PNG tiles with recorded stage positions off
    by up to `stage_error_px` (zero on average per section, so the stitched frame is the truth's),
    per-tile gain, offset and noise; returns the CSV manifest. Written once: a manifest that
    already exists with the same cut is reused (the demo's montage input)."""
    from exaconnect.montage.manifest import write_csv_manifest, write_tile
    from exaconnect.montage.synthetic import TileCut, cut_tiles

    manifest = os.path.join(folder, "tiles.csv")
    marker = os.path.join(folder, "cut.json")
    cut_record = {"shape": list(stack_zyx.shape), "tile_size": tile_size, "overlap": overlap,
                  "stage_error_px": stage_error_px, "seed": seed}
    if os.path.exists(manifest) and os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == cut_record:
                return manifest
    os.makedirs(os.path.join(folder, "tiles"), exist_ok=True)
    rows = []
    for z, section in enumerate(stack_zyx):
        cut = cut_tiles(section, TileCut(tile_shape=(tile_size, tile_size), overlap=overlap,
                                         stage_error_px=stage_error_px, gain=0.05, offset=5.0, noise=2.0,
                                         seed=seed * 100003 + z))
        cut.stage_xy -= (cut.stage_xy - cut.true_xy).mean(axis=0)
        for i, (tile, (x, y)) in enumerate(zip(cut.tiles, cut.stage_xy)):
            name = f"tiles/z{z:05d}_{i:03d}.png"
            write_tile(os.path.join(folder, name), tile)
            rows.append((z, name, float(x), float(y)))
    write_csv_manifest(manifest + ".tmp", rows)
    os.replace(manifest + ".tmp", manifest)
    with open(marker, "w") as f:
        json.dump(cut_record, f)
    return manifest


def montage_summary(layer: str) -> dict:
    """The montage's figures over every section: tiles placed and not, pairs used and rejected,
    the seam residual (median of the sections' medians, the largest max)."""
    reports = [load_report(layer, z) for z in _sections(layer)]
    if not reports:
        return {}
    medians = [r["seam_residual_median_px"] for r in reports if r.get("seam_residual_median_px") is not None]
    maxima = [r["seam_residual_max_px"] for r in reports if r.get("seam_residual_max_px") is not None]
    return {"sections": len(reports), "tiles": sum(r["tiles"] for r in reports),
            "tiles_placed": sum(r["tiles_placed"] for r in reports),
            "tiles_not_placed": sum(len(r.get("tiles_not_placed", [])) for r in reports),
            "tiles_skipped": sum(len(r.get("tiles_skipped", [])) for r in reports),
            "pairs_used": sum(r["pairs_used"] for r in reports),
            "pairs_rejected": sum(r["pairs_rejected"] for r in reports),
            "pairs_untrusted": sum(r.get("pairs_untrusted", 0) for r in reports),
            "seam_residual_median_px": float(np.median(medians)) if medians else None,
            "seam_residual_max_px": float(max(maxima)) if maxima else None}


# ---------------------------------------------------------------- stage 5: tile outlines

# The tile outlines live beside the image they describe, as a precomputed annotation layer of
# their own (LAYER/tile_outlines/info), so a link can show where each tile went and how.
OUTLINES_DIR = "tile_outlines"
# Annotation ids read as the section and the tile: z * TILE_ID_STRIDE + index (5000007 is tile 7
# of section 5), unique over the layer and stable across reruns.
TILE_ID_STRIDE = 1_000_000
# Green: placed by its pairs; red: only at its recorded stage position (the report says why).
OUTLINE_COLORS = {True: (0, 220, 0), False: (255, 48, 0)}


def outlines_url(layer: str) -> str:
    """The annotation layer of the tile outlines of the stitched image layer `layer`."""
    return f"{layer_url(layer)}/{OUTLINES_DIR}"


def _outline_writer(dimensions: dict):
    """neuroglancer's own annotation encoder for the tile boxes and their properties; we only
    take its records (one section at a time) and write the files ourselves, so that the layer
    can grow to thousands of sections without holding them all and can live in a bucket."""
    import neuroglancer
    from neuroglancer.write_annotations import AnnotationWriter

    spec = neuroglancer.AnnotationPropertySpec
    # 32-bit properties as int32/float32 only: the writer aligns uint32 to 3 bytes, neuroglancer's
    # client to 4, and with these types both lay a record out alike (and in the order listed).
    properties = [
        spec(id="tile", type="int32", description="index of the tile in its section (manifest order)"),
        spec(id="section", type="int32", description="z of the section"),
        spec(id="moved_px", type="float32", description="distance from the recorded stage position to the placed one"),
        spec(id="placed", type="uint8", enum_values=[0, 1], enum_labels=["stage position only", "solved"],
             description="solved from its neighbour pairs, or left at its stage position"),
        spec(id="color", type="rgb"),
    ]
    return AnnotationWriter(neuroglancer.CoordinateSpace(json=dimensions), "axis_aligned_bounding_box",
                            properties=properties)


def _encode_cell(annotations) -> bytes:
    """A spatial-index cell: uint64 count, the records, then the uint64 ids (all little-endian)."""
    ids = np.array([a.id for a in annotations], dtype="<u8")
    return np.uint64(len(annotations)).astype("<u8").tobytes() + b"".join(a.encoded for a in annotations) + ids.tobytes()


def add_section_outlines(writer, solved: dict, shapes: list[tuple[int, int]], z: int) -> None:
    """One box per tile of the solved section `z`: x, y from its position and size, z..z+1."""
    if len(shapes) >= TILE_ID_STRIDE:
        raise LayerError(f"section z={z}: {len(shapes)} tiles; tile outlines number at most {TILE_ID_STRIDE - 1} per section")
    for record, (height, width) in zip(solved["tiles"], shapes):
        x, y, placed = float(record["x"]), float(record["y"]), record["status"] == "placed"
        writer.add_axis_aligned_bounding_box(
            (x, y, z), (x + width, y + height, z + 1), id=z * TILE_ID_STRIDE + int(record["index"]),
            tile=int(record["index"]), section=z, placed=int(placed), color=OUTLINE_COLORS[placed],
            moved_px=float(np.hypot(x - record["stage_x"], y - record["stage_y"])))


class MontageOutlinesTask(RegisteredTask):
    """The tile outlines of one section: its spatial-index cell and one `by_id` file per tile."""

    def __init__(self, layer: str, z: int):
        super().__init__(layer, z)

    def execute(self) -> None:
        z = int(self.z)
        store = ArtifactStore(outlines_url(self.layer))
        info = store.get_json("info")
        if info is None:
            raise LayerError(f"{store.where('info')} is not complete; start the montage outlines stage again")
        shapes = [(t.height, t.width) for t in load_tile_set(self.layer).section(z)]
        writer = _outline_writer(info["dimensions"])
        add_section_outlines(writer, load_section(self.layer, "solve", z), shapes, z)
        from cloudfiles import CloudFiles

        # by_id first and the cell last (with its marker): a cell present means the section is whole.
        CloudFiles(store.url).puts([(f"by_id/{a.id}", a.encoded) for a in writer.annotations], compress=None, raw=True,
                                   content_type="application/octet-stream", cache_control="no-cache")
        z0 = int(info["lower_bound"][2])
        store.put(f"spatial0/0_0_{z - z0}", _encode_cell(writer.annotations))


def create_montage_outline_tasks(layer: str) -> list[MontageOutlinesTask]:
    """Write the annotation layer's `info` (bounds from the stitched image layer, one spatial cell
    per section) and return one task per section."""
    from exaconnect.precomputed.layers import read_info

    url = layer_url(layer)
    sections = _sections(url)
    _require(url, "solve", sections)
    image = read_info(url)
    if image is None:
        raise LayerError(f"layer {url} has no info; run the montage render stage first")
    scale = image["scales"][0]
    offset, size = scale["voxel_offset"], scale["size"]
    # Boxes sit at sub-pixel positions up to half a pixel beyond the rounded image bounds.
    lower = [float(offset[0] - 1), float(offset[1] - 1), float(min(sections))]
    upper = [float(offset[0] + size[0] + 1), float(offset[1] + size[1] + 1), float(max(sections) + 1)]
    tiles = load_tile_set(url)
    per_section: dict[int, int] = {}
    for tile in tiles.tiles:
        per_section[tile.z] = per_section.get(tile.z, 0) + 1
    dimensions = {axis: [float(r) * 1e-9, "m"] for axis, r in zip("xyz", scale["resolution"])}
    writer = _outline_writer(dimensions)
    info = {
        "@type": "neuroglancer_annotations_v1",
        "dimensions": dimensions,
        "lower_bound": lower,
        "upper_bound": upper,
        "annotation_type": "axis_aligned_bounding_box",
        # The writer orders the properties as it packs them; the info must list them so.
        "properties": [p.to_json() for p in writer.properties],
        "relationships": [],
        "by_id": {"key": "by_id"},
        # One cell per section: a cross-section view fetches only the boxes of the section shown.
        "spatial": [{"key": "spatial0", "grid_shape": [1, 1, int(upper[2] - lower[2])],
                     "chunk_size": [upper[0] - lower[0], upper[1] - lower[1], 1.0],
                     "limit": max(per_section.values(), default=1)}],
    }
    ArtifactStore(outlines_url(url)).put_json("info", info)
    return [MontageOutlinesTask(url, z) for z in sections]


@dataclass(frozen=True)
class MontageOutlines(Stage):
    """Every tile's placed outline as a precomputed annotation layer beside the image, one task per section."""

    service: ClassVar[str] = "montage"
    stage_name: ClassVar[str] = "montage.outlines"
    description: ClassVar[str] = "montage: tile outlines annotation layer"
    report: MontageReport

    def requires(self) -> tuple[Stage, ...]:
        return (self.report,)

    def make_tasks(self) -> list:
        return create_montage_outline_tasks(self.report.render.solve.match.layer)

    def reads(self) -> tuple[str, ...]:
        return (f"{self.report.render.solve.match.layer}/{MONTAGE_DIR}/solve",)

    def writes(self) -> tuple[str, ...]:
        return (outlines_url(self.report.render.solve.match.layer),)
