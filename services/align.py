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
import tempfile
from typing import Iterable

import numpy as np
from taskqueue import RegisteredTask

from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.bbox import Box, chunk_grid
from exaconnect.precomputed.layers import (LayerSpec, Provenance, create_layer, layer_bounds, layer_url, local_path,
                                           open_layer, read_box, write_box)
from exaconnect.align.match import AlignConfig, finalize_meshes, match_section
from exaconnect.align.mesh import SectionFlow, block_ranges, solve_block
from exaconnect.align.warp import region_map, source_window, to_dtype, warp_region

ALIGN_DIR = "align"


# ---------------------------------------------------------------- files beside the layer

def put_file(layer: str, key: str, data: bytes) -> None:
    """Write `key` under the layer atomically: a temporary file renamed into place on local
    disk (a reader never sees half a file), a single PUT on object stores."""
    path = local_path(layer)
    if path is not None:
        final = os.path.join(path, key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
        return
    from cloudfiles import CloudFiles

    CloudFiles(layer_url(layer)).put(key, data, compress=None, cache_control="no-cache")


def get_file(layer: str, key: str) -> bytes | None:
    path = local_path(layer)
    if path is not None:
        full = os.path.join(path, key)
        if not os.path.exists(full):
            return None
        with open(full, "rb") as f:
            return f.read()
    from cloudfiles import CloudFiles

    return CloudFiles(layer_url(layer)).get(key)


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(layer: str, key: str) -> dict:
    raw = get_file(layer, key)
    if raw is None:
        raise LayerError(f"layer {layer_url(layer)}: {key} is missing; run the earlier align stage first")
    with np.load(io.BytesIO(raw), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_config(dest: str) -> AlignConfig:
    raw = get_file(dest, f"{ALIGN_DIR}/config.json")
    if raw is None:
        raise LayerError(f"layer {layer_url(dest)}: no {ALIGN_DIR}/config.json; enqueue the align flow stage first")
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
        vol = open_layer(self.src, fill_missing=True)
        bounds = layer_bounds(vol)
        first = max(0, int(self.z_start) - config.max_skip)
        stack = _read_sections(vol, bounds, first, int(self.z_stop))
        sections = {first + i: stack[i] for i in range(stack.shape[0])}
        masks: dict = {}
        for z in range(int(self.z_start), int(self.z_stop)):
            match = match_section(sections, z, config, masks)
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
    config = load_config(dest)
    bounds = layer_bounds(open_layer(dest))
    width, height, depth = bounds.shape
    reports = {z: load_section_report(dest, z) for z in range(depth)}
    ranges = block_ranges(depth, config.mesh, {z: r["reference"] for z, r in reports.items()},
                          {z: r["status"] for z, r in reports.items()})
    put_file(dest, f"{ALIGN_DIR}/blocks.json", json.dumps(ranges).encode())
    return [AlignBlockTask(layer_url(dest), a, b, height, width) for a, b in ranges]


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
            raise LayerError(f"layer {layer_url(self.dest)}: no {ALIGN_DIR}/blocks.json; run the align mesh stage first")
        blocks = []
        for start, _ in ranges:
            data = _load_npz(self.dest, _block_key(start))
            blocks.append((start, {int(z): m for z, m in zip(data["z"], data["meshes"])}))
        reports = {z: load_section_report(self.dest, z) for z in range(depth)}
        statuses = {z: r["status"] for z, r in reports.items()}
        meshes = finalize_meshes(blocks, (height, width), statuses, config.mesh)
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
        src_vol = open_layer(self.src, fill_missing=True)
        dest_vol = open_layer(self.dest)
        meshes, stride = load_meshes(self.dest)
        box = Box.from_list(self.box)
        write_box(dest_vol, box, render_box(src_vol, meshes, stride, layer_bounds(src_vol), box,
                                            inverted=load_inverted(self.dest)))


def create_align_render_tasks(src: str, dest: str, task_shape: tuple[int, int, int] | None = None) -> list[AlignRenderTask]:
    load_meshes(dest)  # fail now, not in every task, if compose has not run
    dest_vol = open_layer(dest)
    chunk = tuple(dest_vol.info["scales"][0]["chunk_sizes"][0])
    shape = task_shape or (chunk[0] * 4, chunk[1] * 4, chunk[2])
    src_url, dest_url = layer_url(src), layer_url(dest)
    return [AlignRenderTask(src_url, dest_url, cell.write.to_list())
            for cell in chunk_grid(layer_bounds(dest_vol), shape, align_to=chunk)]


# ---------------------------------------------------------------- all stages, locally

STAGES = ("flow", "mesh", "compose", "render")


def stage_tasks(stage: str, src: str, dest: str, config: AlignConfig | None = None) -> list:
    if stage == "flow":
        return create_align_flow_tasks(src, dest, config or AlignConfig())
    if stage == "mesh":
        return create_align_block_tasks(dest)
    if stage == "compose":
        return create_align_compose_tasks(dest)
    if stage == "render":
        return create_align_render_tasks(src, dest)
    raise InputError(f"align stage {stage!r}: expected one of {STAGES}")


def align_stack_through_queue(src: str, dest: str, queue: str, workers: int = 1, config: AlignConfig = AlignConfig(),
                              stages: Iterable[str] = STAGES) -> dict[str, float]:
    """Run the stages in order, each enqueued on `queue` and drained by `workers` local worker
    processes (1: in this process). Returns seconds per stage; raises if a task dead-letters."""
    import time

    from exaconnect.errors import ExaconnectError
    from exaconnect.services.queue import enqueue, queue_status
    from exaconnect.services.worker import Worker, WorkerOptions, run_workers

    seconds = {}
    for stage in stages:
        started = time.time()
        tasks = stage_tasks(stage, src, dest, config)
        count = enqueue(queue, tasks, description=f"align {stage}")
        options = WorkerOptions(lease_seconds=600, exit_when_empty=True, idle_poll_seconds=0.2)
        if workers <= 1:
            Worker(queue, options).run()
        else:
            run_workers(queue, options, processes=min(workers, count))
        status = queue_status(queue)
        if status.failed or status.enqueued:
            raise ExaconnectError(f"align stage {stage}: {status.failed} tasks failed, {status.enqueued} left on {queue}")
        seconds[stage] = time.time() - started
    return seconds


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
    src_vol, dest_vol = open_layer(src, fill_missing=True), open_layer(dest, fill_missing=True)
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
    residual_config = flow_config or FlowConfig(patch_size=config.flow.patch_size, stride=config.flow.stride * 2,
                                                coarse_factor=1, refine_iterations=0,
                                                min_peak_sharpness=config.flow.min_peak_sharpness,
                                                min_peak_ratio=config.flow.min_peak_ratio)
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
