"""Align: elastic alignment of serial sections through the queue, in four stages.

  1. flow     one task per z-slab: each section's flow field to the nearest usable earlier section
              (`align/flow/ZZZZZ.npz`);
  2. mesh     one task per block of sections (overlapping the previous block): spring meshes
              relaxed section by section in the block's own frame (`align/blocks/ZZZZZ.npz`);
  3. compose  one task: blocks chained into stack-wide meshes (`align/meshes.npz`, plus
              `align/sections.json` with every section's status);
  4. render   one task per chunk-aligned box of the destination image layer.
Each stage needs the previous one finished (`align_stack_through_queue` drains them in order;
on a cluster, enqueue the next stage when `exaconnect status` shows the queue empty). All
intermediate files are written atomically under the destination layer, so a rerun of any task
rewrites the same bytes. The configuration is stored once, in `align/config.json`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from typing import Any, ClassVar, Iterable

import numpy as np
from taskqueue import RegisteredTask

from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.bbox import Box, chunk_grid
from exaconnect.precomputed.store import ArtifactStore
from exaconnect.precomputed.verify import record_checksums, require_complete
from exaconnect.precomputed.layers import (LayerSpec, LayerUrl, Provenance, create_layer, layer_bounds, layer_url,
                                           local_path, open_layer, read_box, write_box)
from exaconnect.align.match import AlignConfig, finalize_meshes, match_section
from exaconnect.services.stages import ChainedStep, Stage
from exaconnect.align.mesh import SectionFlow, block_ranges, solve_block
from exaconnect.align.warp import region_map, source_window, to_dtype, warp_region

ALIGN_DIR = "align"


# ---------------------------------------------------------------- files beside the layer

def put_file(layer: str, key: str, data: bytes) -> None:
    """Write `key` under the layer through the run store (precomputed/store.py): atomically, and
    vouched for by a `.done` marker, so no stage reads half a file."""
    ArtifactStore(layer).put(key, data)


def get_file(layer: str, key: str) -> bytes | None:
    """A completed file under the layer, or None when absent or unfinished."""
    return ArtifactStore(layer).get(key)


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(layer: str, key: str) -> dict:
    raw = get_file(layer, key)
    if raw is None:
        raise LayerError(f"layer {layer}: {key} is missing; run the earlier align stage first")
    with np.load(io.BytesIO(raw), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_config(dest: str) -> AlignConfig:
    raw = get_file(dest, f"{ALIGN_DIR}/config.json")
    if raw is None:
        raise LayerError(f"layer {dest}: no {ALIGN_DIR}/config.json; enqueue the align flow stage first")
    return AlignConfig.from_dict(json.loads(raw))


def _flow_key(z: int) -> str:
    return f"{ALIGN_DIR}/flow/{z:05d}.npz"


def _block_key(start: int) -> str:
    return f"{ALIGN_DIR}/blocks/{start:05d}.npz"


def _read_sections(vol, bounds: Box, z_start: int, z_stop: int) -> np.ndarray:
    """Sections z_start..z_stop-1 (indices from the layer's first section) as [z, y, x]."""
    box = Box((bounds.start[0], bounds.start[1], bounds.start[2] + z_start),
              (bounds.stop[0], bounds.stop[1], bounds.start[2] + z_stop))
    return read_box(vol, box)


def load_section_flow(dest: str, z: int) -> SectionFlow:
    data = _load_npz(dest, _flow_key(z))
    has = bool(data["has_flow"])
    return SectionFlow(z, int(data["reference"]), str(data["status"]), data["flow"] if has else None,
                       data["valid"] if has else None, int(data["flow_stride"]))


def load_section_report(dest: str, z: int) -> dict:
    data = _load_npz(dest, _flow_key(z))
    return json.loads(str(data["report"]))


# ---------------------------------------------------------------- stage 1: flow

class AlignFlowTask(RegisteredTask):
    """Flow fields of sections z_start..z_stop-1 (section indices from the layer's first z)."""

    def __init__(self, src: str, dest: str, z_start: int, z_stop: int):
        super().__init__(src, dest, z_start, z_stop)

    def execute(self) -> None:
        config = load_config(self.dest)
        vol = open_layer(self.src)
        bounds = layer_bounds(vol)
        first = max(0, int(self.z_start) - config.max_skip)
        width, height, _ = bounds.shape
        tile = config.flow.tile_size
        if tile and max(height, width) > tile:
            matches = _match_tiled(vol, bounds, first, int(self.z_start), int(self.z_stop), config)
        else:
            stack = _read_sections(vol, bounds, first, int(self.z_stop))
            sections = {first + i: stack[i] for i in range(stack.shape[0])}
            cache: dict = {}  # prepared sections, shared by the pairs each section is part of
            matches = (match_section(sections, z, config, cache) for z in range(int(self.z_start), int(self.z_stop)))
        for match in matches:
            z = match.z
            field = match.field
            report = {
                "z": z, "reference": match.reference, "status": match.status, "tried": match.tried,
                "coarse_shift": list(match.coarse_shift), "coarse_correlation": match.coarse_correlation,
                "textured_fraction": match.textured_fraction,
                "valid_fraction": field.valid_fraction if field is not None else 0.0,
            }
            empty = np.zeros((0, 0, 2))
            put_file(self.dest, _flow_key(z), _npz_bytes(
                reference=np.int64(match.reference), status=np.str_(match.status),
                has_flow=np.bool_(field is not None),
                flow=field.flow if field is not None else empty,
                valid=field.valid if field is not None else np.zeros((0, 0), bool),
                flow_stride=np.int64(field.stride if field is not None else 0),
                report=np.str_(json.dumps(report)),
            ))


def _read_window(vol, bounds: Box, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Pixels y0:y1, x0:x1 of section z (indices from the layer's origin), zero outside it."""
    width, height, _ = bounds.shape
    out = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    if cy0 < cy1 and cx0 < cx1:
        box = Box((bounds.start[0] + cx0, bounds.start[1] + cy0, bounds.start[2] + z),
                  (bounds.start[0] + cx1, bounds.start[1] + cy1, bounds.start[2] + z + 1))
        out[cy0 - y0: cy1 - y0, cx0 - x0: cx1 - x0] = read_box(vol, box)[0]
    return out


def _match_tiled(vol, bounds: Box, first: int, z_start: int, z_stop: int, config: AlignConfig):
    """Matches of sections too big to hold (wider than flow.tile_size): block-mean overviews read
    strip by strip, then flow tile by tile on windows read from the layer (align.match)."""
    from exaconnect.align.flow import downsample
    from exaconnect.align.match import match_section_tiled, overview_factor

    width, height, _ = bounds.shape
    factor = overview_factor((height, width))
    strip = max(factor, (config.flow.tile_size // factor) * factor)
    overviews = {}
    for z in range(first, z_stop):
        # Tile by tile (strip x strip px), so that no full-resolution section is ever held.
        ov = np.zeros((height // factor, width // factor), np.float32)
        for y in range(0, (height // factor) * factor, strip):
            for x in range(0, (width // factor) * factor, strip):
                y1, x1 = min(y + strip, (height // factor) * factor), min(x + strip, (width // factor) * factor)
                ov[y // factor: y1 // factor, x // factor: x1 // factor] = downsample(
                    _read_window(vol, bounds, z, y, y1, x, x1), factor)
        overviews[z] = ov
    read = lambda z, y0, y1, x0, x1: _read_window(vol, bounds, z, y0, y1, x0, x1)  # noqa: E731
    for z in range(z_start, z_stop):
        yield match_section_tiled(read, overviews, factor, z, (height, width), config)


def _destination_spec(src_vol) -> LayerSpec:
    bounds = layer_bounds(src_vol)
    scale = src_vol.info["scales"][0]
    return LayerSpec("image", src_vol.dtype.name if hasattr(src_vol.dtype, "name") else str(src_vol.dtype),
                     bounds.shape, tuple(scale["resolution"]), bounds.start, tuple(scale["chunk_sizes"][0]))


def create_align_flow_tasks(src: str, dest: str, config: AlignConfig = AlignConfig(),
                            sections_per_task: int | None = None) -> list[AlignFlowTask]:
    """Create the destination layer (same geometry as the source), store the configuration and
    return one flow task per z-slab (the source's chunk depth by default, so that each task reads
    whole chunks)."""
    src_url, dest_url = layer_url(src), layer_url(dest)
    if src_url == dest_url:
        raise InputError(f"align: source and destination are the same layer {src_url}; expected a new layer")
    vol = open_layer(src_url, layer_type="image")
    # A missing chunk would read as a blank patch of a section: refuse it before anything is
    # written (a section that is really blank is stored, and is reported and bridged).
    require_complete(src_url, 0, None, "align")
    spec = _destination_spec(vol)
    create_layer(dest_url, spec, Provenance("align", config.as_dict(), [src_url]))
    put_file(dest_url, f"{ALIGN_DIR}/config.json", json.dumps(config.as_dict(), indent=1).encode())
    depth = spec.size[2]
    step = sections_per_task or spec.chunk_size[2]
    return [AlignFlowTask(src_url, dest_url, z, min(depth, z + step)) for z in range(0, depth, step)]


# ---------------------------------------------------------------- stage 2: mesh blocks

class AlignBlockTask(RegisteredTask):
    """Spring meshes of one block of sections in the block's own frame."""

    def __init__(self, dest: str, z_start: int, z_stop: int, height: int, width: int):
        super().__init__(dest, z_start, z_stop, height, width)

    def execute(self) -> None:
        config = load_config(self.dest)
        start, stop = int(self.z_start), int(self.z_stop)
        flows = {z: load_section_flow(self.dest, z) for z in range(start, stop)}
        meshes, notes = solve_block(flows, start, stop, (int(self.height), int(self.width)), config.mesh)
        zs = sorted(meshes)
        put_file(self.dest, _block_key(start), _npz_bytes(
            z=np.array(zs), meshes=np.stack([meshes[z] for z in zs]),
            notes=np.str_(json.dumps({str(z): notes[z] for z in zs}))))


def create_align_block_tasks(dest: str) -> list[AlignBlockTask]:
    """One task per block; the blocks (anchored on well-matched sections, which needs the flow
    stage's results) are recorded in `align/blocks.json` for the compose stage."""
    dest = layer_url(dest)
    config = load_config(dest)
    bounds = layer_bounds(open_layer(dest))
    width, height, depth = bounds.shape
    reports = {z: load_section_report(dest, z) for z in range(depth)}
    ranges = block_ranges(depth, config.mesh, {z: r["reference"] for z, r in reports.items()},
                          {z: r["status"] for z, r in reports.items()})
    put_file(dest, f"{ALIGN_DIR}/blocks.json", json.dumps(ranges).encode())
    return [AlignBlockTask(dest, a, b, height, width) for a, b in ranges]


# ---------------------------------------------------------------- stage 3: compose

class AlignComposeTask(RegisteredTask):
    """Chain the block solutions into stack-wide meshes and record every section's status."""

    def __init__(self, dest: str):
        super().__init__(dest)

    def execute(self) -> None:
        config = load_config(self.dest)
        bounds = layer_bounds(open_layer(self.dest))
        width, height, depth = bounds.shape
        ranges = json.loads(get_file(self.dest, f"{ALIGN_DIR}/blocks.json") or b"null")
        if ranges is None:
            raise LayerError(f"layer {self.dest}: no {ALIGN_DIR}/blocks.json; run the align mesh stage first")
        blocks = []
        for start, _ in ranges:
            data = _load_npz(self.dest, _block_key(start))
            blocks.append((start, {int(z): m for z, m in zip(data["z"], data["meshes"])}))
        reports = {z: load_section_report(self.dest, z) for z in range(depth)}
        statuses = {z: r["status"] for z, r in reports.items()}
        drift: dict = {}
        meshes = finalize_meshes(blocks, (height, width), statuses, config.mesh, drift)
        put_file(self.dest, f"{ALIGN_DIR}/drift.json", json.dumps(drift, indent=1).encode())
        zs = sorted(meshes)
        inverted = np.array([z for z, s in statuses.items() if s == "inverted"], dtype=np.int64)
        put_file(self.dest, f"{ALIGN_DIR}/meshes.npz", _npz_bytes(z=np.array(zs), meshes=np.stack([meshes[z] for z in zs]),
                                                                 stride=np.int64(config.mesh.stride), inverted=inverted))
        put_file(self.dest, f"{ALIGN_DIR}/sections.json", json.dumps(list(reports.values()), indent=1).encode())


def create_align_compose_tasks(dest: str) -> list[AlignComposeTask]:
    return [AlignComposeTask(layer_url(dest))]


def load_meshes(dest: str) -> tuple[dict[int, np.ndarray], int]:
    data = _load_npz(dest, f"{ALIGN_DIR}/meshes.npz")
    return {int(z): m for z, m in zip(data["z"], data["meshes"])}, int(data["stride"])


def load_inverted(dest: str) -> set[int]:
    """Sections that only matched with their contrast inverted (rendered with it restored)."""
    data = _load_npz(dest, f"{ALIGN_DIR}/meshes.npz")
    return {int(z) for z in data.get("inverted", [])}


# ---------------------------------------------------------------- stage 4: render

# Cubic interpolation reads up to 2 pixels beyond the sample position.
RENDER_MARGIN = 3


def render_box(src_vol, meshes: dict[int, np.ndarray], stride: int, bounds: Box, box: Box, order: int = 3,
               inverted: set[int] = frozenset()) -> np.ndarray:
    """The aligned image of `box` (destination coordinates) as [z, y, x], read from the source
    window its meshes touch. Sections in `inverted` (integer layers) get their contrast back."""
    width, height, _ = bounds.shape
    x0, y0, z0 = (a - b for a, b in zip(box.start, bounds.start))
    x1, y1, z1 = (a - b for a, b in zip(box.stop, bounds.start))
    region = (y0, y1, x0, x1)
    positions = {z: region_map(meshes[z], stride, region) for z in range(z0, z1)}
    windows = [w for w in (source_window(p, RENDER_MARGIN, (height, width)) for p in positions.values()) if w]
    out = np.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=np.float32)
    if not windows:
        return to_dtype(out, src_vol.dtype)
    wy0, wy1 = min(w[0] for w in windows), max(w[1] for w in windows)
    wx0, wx1 = min(w[2] for w in windows), max(w[3] for w in windows)
    source_box = Box((bounds.start[0] + wx0, bounds.start[1] + wy0, bounds.start[2] + z0),
                     (bounds.start[0] + wx1, bounds.start[1] + wy1, bounds.start[2] + z1))
    source = read_box(src_vol, source_box)
    top = np.iinfo(src_vol.dtype).max + 1 if np.dtype(src_vol.dtype).kind in "ui" else None
    for i, z in enumerate(range(z0, z1)):
        out[i], valid = warp_region(source[i], (wy0, wx0), positions[z], order=order, section_shape=(height, width))
        if z in inverted and top is not None:
            out[i] = np.where(valid & (out[i] > 0), top - out[i], 0.0)
    return to_dtype(out, src_vol.dtype)


class AlignRenderTask(RegisteredTask):
    """Warp one chunk-aligned box of the destination layer from the source."""

    def __init__(self, src: str, dest: str, box: list[int]):
        super().__init__(src, dest, box)

    def execute(self) -> None:
        src_vol = open_layer(self.src)
        dest_vol = open_layer(self.dest)
        meshes, stride = load_meshes(self.dest)
        box = Box.from_list(self.box)
        write_box(dest_vol, box, render_box(src_vol, meshes, stride, layer_bounds(src_vol), box,
                                            inverted=load_inverted(self.dest)))
        record_checksums(dest_vol, box)


def create_align_render_tasks(src: str, dest: str, task_shape: tuple[int, int, int] | None = None) -> list[AlignRenderTask]:
    src, dest = layer_url(src), layer_url(dest)
    load_meshes(dest)  # fail now, not in every task, if compose has not run
    dest_vol = open_layer(dest)
    chunk = tuple(dest_vol.info["scales"][0]["chunk_sizes"][0])
    shape = task_shape or (chunk[0] * 4, chunk[1] * 4, chunk[2])
    return [AlignRenderTask(src, dest, cell.write.to_list())
            for cell in chunk_grid(layer_bounds(dest_vol), shape, align_to=chunk)]


# ---------------------------------------------------------------- the stages, as data

STAGES = ("flow", "mesh", "compose", "render", "report")


def stage_tasks(stage: str, src: LayerUrl, dest: LayerUrl, config: AlignConfig | None = None) -> list:
    if stage == "flow":
        return create_align_flow_tasks(src, dest, config or AlignConfig())
    if stage == "mesh":
        return create_align_block_tasks(dest)
    if stage == "compose":
        return create_align_compose_tasks(dest)
    if stage == "render":
        return create_align_render_tasks(src, dest)
    if stage == "report":
        return [AlignReportTask(src, dest)]
    raise InputError(f"align stage {stage!r}: expected one of {STAGES}")


@dataclass(frozen=True)
class AlignStep(ChainedStep):
    """One step of the alignment of `src` into `dest` (flow, mesh, compose, render, report), each
    requiring the one before it (the first: `upstream`). The alignment's spring meshes are the
    `mesh` step; they have nothing to do with neuroglancer meshes (services/mesh.py)."""

    service: ClassVar[str] = "align"
    stage_name: ClassVar[str] = "align"
    steps: ClassVar[tuple[str, ...]] = STAGES
    step_kind: ClassVar[str] = "align"
    step_names: ClassVar[str] = "align.{step}"
    src: LayerUrl
    dest: LayerUrl
    config: Any = None  # AlignConfig, or one resolved when the step starts (see _resolve)

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"alignment: {self.step}"

    def make_tasks(self) -> list:
        return stage_tasks(self.step, self.src, self.dest, _resolve(self.config) if self.config is not None else None)

    def reads(self) -> tuple[str, ...]:
        return (self.src,)

    def writes(self) -> tuple[str, ...]:
        return (self.dest,) if self.step == "render" else (f"{self.dest}/{ALIGN_DIR}/{self.step}",)


def align_stages(src: str, dest: str, config: Any, upstream: tuple[Stage, ...] = (), prefix: str = "align",
                 steps: Iterable[str] = STAGES) -> list[AlignStep]:
    """flow -> mesh -> compose -> render -> report (or the first of them named in `steps`) as
    stages named `PREFIX.STEP`."""
    return AlignStep.chain(upstream, steps, name=lambda step: f"{prefix}.{step}", src=src, dest=dest, config=config)


@dataclass(frozen=True)
class AlignApply(Stage):
    """Another layer (labels, another channel) through a finished alignment."""

    service: ClassVar[str] = "align"
    stage_name: ClassVar[str] = "align.apply"
    description: ClassVar[str] = "a layer through the alignment"
    src: LayerUrl
    dest: LayerUrl
    alignment: LayerUrl
    order: int = 0

    def make_tasks(self) -> list:
        return create_align_apply_tasks(self.src, self.dest, self.alignment, order=self.order)

    def reads(self) -> tuple[str, ...]:
        return (self.src, self.alignment)

    def writes(self) -> tuple[str, ...]:
        return (self.dest,)


def _resolve(config):
    """A config whose defaults depend on the source layer is resolved when its stage starts
    (the layer may not exist when the stages are planned)."""
    return config.resolve() if hasattr(config, "resolve") else config


def align_stack_through_queue(src: str, dest: str, queue: str, workers: int = 1, config: AlignConfig = AlignConfig(),
                              stages: Iterable[str] = STAGES[:-1]) -> dict[str, float]:
    """The align stages through the runner with `workers` local workers (1: in this process),
    queues under `queue`; returns seconds per stage; raises if a task dead-letters."""
    from exaconnect.services.runner import RunnerOptions, run_stages

    chosen = align_stages(src, dest, config, steps=stages)  # the stages make the names URLs
    report = run_stages(chosen, RunnerOptions(queue, f"{chosen[0].dest}/{ALIGN_DIR}/run", workers=workers,
                                              progress=False))
    return {name.split(".", 1)[1]: seconds for name, seconds in report.seconds.items()}


class AlignReportTask(RegisteredTask):
    """The quality report of a finished alignment (report.json + report.png beside the layer)."""

    def __init__(self, src: str, dest: str):
        super().__init__(src, dest)

    def execute(self) -> None:
        align_report(self.src, self.dest)


class AlignApplyTask(RegisteredTask):
    """Render one box of another layer (labels, another channel) through a finished alignment's
    meshes: `alignment` is the aligned image layer that holds them. Labels use order 0 (nearest)."""

    def __init__(self, src: str, dest: str, alignment: str, box: list[int], order: int = 0):
        super().__init__(src, dest, alignment, box, order)

    def execute(self) -> None:
        src_vol = open_layer(self.src)
        meshes, stride = load_meshes(self.alignment)
        box = Box.from_list(self.box)
        out = render_box(src_vol, meshes, stride, layer_bounds(src_vol), box, order=int(self.order))
        dest = open_layer(self.dest)
        write_box(dest, box, out)
        record_checksums(dest, box)


def create_align_apply_tasks(src: str, dest: str, alignment: str, order: int = 0) -> list[AlignApplyTask]:
    """Create `dest` with `src`'s geometry and one task per chunk-aligned box."""
    src, dest, alignment = layer_url(src), layer_url(dest), layer_url(alignment)
    load_meshes(alignment)
    src_vol = open_layer(src)
    bounds = layer_bounds(src_vol)
    scale = src_vol.info["scales"][0]
    spec = LayerSpec(src_vol.info["type"], np.dtype(src_vol.dtype).name, bounds.shape, tuple(scale["resolution"]),
                     bounds.start, tuple(scale["chunk_sizes"][0]))
    create_layer(dest, spec, Provenance("align-apply", {"alignment": alignment, "order": order}, [src, alignment]),
                 overwrite=True)
    chunk = spec.chunk_size
    shape = (chunk[0] * 4, chunk[1] * 4, chunk[2])
    return [AlignApplyTask(src, dest, alignment, cell.write.to_list(), order)
            for cell in chunk_grid(bounds, shape, align_to=chunk)]


# ---------------------------------------------------------------- quality report

def align_report(src: str, dest: str, out_png: str | None = None, crop: int = 512,
                 flow_config=None) -> dict:
    """Per-section quality of a finished alignment, written to `align/report.json` (and a PNG):
    chunked neighbour correlation before (source) and after (destination), residual flow
    between aligned neighbours, valid flow fraction and status from the flow stage. Large
    sections are measured on a central `crop` x `crop` window."""
    from exaconnect.align.flow import FlowConfig
    from exaconnect.align.quality import neighbor_correlations, report_figure, residual_flow

    config = load_config(dest)
    src_vol, dest_vol = open_layer(src), open_layer(dest)
    bounds = layer_bounds(dest_vol)
    width, height, depth = bounds.shape
    cy0, cx0 = max(0, (height - crop) // 2), max(0, (width - crop) // 2)
    window = Box((bounds.start[0] + cx0, bounds.start[1] + cy0, bounds.start[2]),
                 (bounds.start[0] + min(width, cx0 + crop), bounds.start[1] + min(height, cy0 + crop), bounds.stop[2]))
    before, after = read_box(src_vol, window), read_box(dest_vol, window)
    sections = json.loads(get_file(dest, f"{ALIGN_DIR}/sections.json") or b"[]")
    statuses = {int(s["z"]): s["status"] for s in sections}
    usable = [z for z in range(depth) if statuses.get(z, "ok") not in ("blank", "unmatched", "inverted")]
    corr_before = neighbor_correlations(before, usable)
    corr_after = neighbor_correlations(after, usable)
    # The alignment's own matcher on a grid half as dense: what neighbours still show as motion.
    residual_config = flow_config or dataclass_replace(config.flow, stride=config.flow.stride * 2, tile_size=0)
    residual = residual_flow(after, usable, residual_config)
    valid_fraction = {int(s["z"]): float(s["valid_fraction"]) for s in sections}

    def mean(values):
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    summary = {
        "sections": depth,
        "usable_sections": len(usable),
        "problem_sections": {str(z): s for z, s in statuses.items() if s not in ("ok", "first")},
        "mean_correlation_before": mean(corr_before.values()),
        "mean_correlation_after": mean(corr_after.values()),
        "median_residual_flow_px": mean([r["median_px"] for r in residual.values()]),
        "p95_residual_flow_px": mean([r["p95_px"] for r in residual.values()]),
        "mean_valid_flow_fraction": mean([valid_fraction[z] for z in usable if z in valid_fraction and statuses.get(z) != "first"]),
        # Blank and unmatched sections carry their neighbour's mesh; inverted ones are rendered
        # with their contrast restored; the section after a bad one matched further back.
        "bridged_sections": {str(z): {"status": s["status"], "reference": s["reference"]} for z, s in
                             ((int(r["z"]), r) for r in sections) if s["status"] not in ("ok", "first")},
        "drift": json.loads(get_file(dest, f"{ALIGN_DIR}/drift.json") or b"null"),
        "per_section": {str(z): {"status": statuses.get(z), "correlation_before": corr_before.get(z),
                                 "correlation_after": corr_after.get(z), "residual": residual.get(z),
                                 "valid_fraction": valid_fraction.get(z)} for z in range(depth)},
    }
    put_file(dest, f"{ALIGN_DIR}/report.json", json.dumps(summary, indent=1, default=float).encode())
    if out_png is not None or local_path(dest) is not None:
        y_mid = before.shape[1] // 2
        png = out_png or os.path.join(local_path(dest), ALIGN_DIR, "report.png")
        report_figure(png, usable, corr_before, corr_after, residual, valid_fraction, statuses,
                      before[:, y_mid, :], after[:, y_mid, :])
        summary["png"] = png
    return summary
