"""Choosing what each section is matched to, and the whole alignment in memory.

`match_section` is the per-section decision the flow tasks make: match to the previous section;
if that fails (blank, contrast-inverted, folded beyond use), try 2..`max_skip` back; if nothing
matches at normal contrast, try the inverted section (reported as such); else give up on the
section (reported), which the mesh stage then carries on its predecessor's mesh.

`align_in_memory` runs flow -> blocks -> composition on an array, the same functions the queue
stages call, for tests and small stacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from exaconnect.errors import InputError
from exaconnect.precomputed.config_loader import load_dataclass
from exaconnect.align.coarse import CoarseConfig, estimate_translation
from exaconnect.align.flow import FlowConfig, FlowField, PreparedSection, estimate_flow, prepare_section
from exaconnect.align.mesh import (SpringMeshConfig, SectionFlow, block_ranges, compose_blocks,
                                               detrend_meshes, drift_window_for, identity_mesh, remove_drift,
                                   solve_block)


@dataclass(frozen=True)
class AlignConfig:
    flow: FlowConfig = field(default_factory=FlowConfig)
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    mesh: SpringMeshConfig = field(default_factory=SpringMeshConfig)
    max_skip: int = 4
    # A section with less texture than this (fraction of pixels) is blank / missing.
    min_textured_fraction: float = 0.2
    # A match needs this fraction of valid flow vectors; below it the pair is not trusted.
    min_valid_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.max_skip < 1:
            raise InputError(f"align max_skip {self.max_skip}: expected >= 1")
        for name in ("min_textured_fraction", "min_valid_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"align {name} {getattr(self, name)}: expected a fraction in [0, 1]")

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AlignConfig":
        return load_dataclass(cls, data, "align")


@dataclass
class MatchResult:
    z: int
    reference: int
    status: str
    field: FlowField | None
    coarse_shift: tuple[float, float]
    coarse_correlation: float
    textured_fraction: float
    tried: list[int]

    def section_flow(self) -> SectionFlow:
        return SectionFlow(self.z, self.reference, self.status,
                           None if self.field is None else self.field.flow,
                           None if self.field is None else self.field.valid,
                           0 if self.field is None else self.field.stride)


def config_for_shape(section_shape: tuple[int, int], **mesh_options) -> AlignConfig:
    """SOFIMA's 160 px patches every 40 px for sections of 640 px and more; smaller sections
    (test crops, the 96 px demo sample) get patches of a quarter of the section, so that the
    grid still has interior points, every quarter patch."""
    side = min(section_shape)
    patch = int(min(160, max(32, (side // 4) // 8 * 8)))
    stride = patch // 4
    return AlignConfig(flow=FlowConfig(patch_size=patch, stride=stride),
                       mesh=SpringMeshConfig(stride=stride, **mesh_options))


def prepared(sections: dict[int, np.ndarray], cache: dict, z: int, config: AlignConfig) -> PreparedSection:
    """Section z as the matcher sees it (mask, high-pass, patch transforms), computed once per
    section and shared by every pair it is part of."""
    if z not in cache or not isinstance(cache[z], PreparedSection):
        cache[z] = prepare_section(sections[z], config.flow)
    return cache[z]


def match_section(sections: dict[int, np.ndarray], z: int, config: AlignConfig,
                  masks: dict | None = None) -> MatchResult:
    """Match section z to the nearest usable earlier section among `sections` (z-1 .. z-max_skip).
    `masks` is a cache of prepared sections (keyed by z) shared between calls."""
    cache = masks if masks is not None else {}
    this = prepared(sections, cache, z, config)
    textured = this.textured_fraction
    if textured < config.min_textured_fraction:
        return MatchResult(z, -1, "blank", None, (0.0, 0.0), 0.0, textured, [])
    candidates = [k for k in range(z - 1, z - 1 - config.max_skip, -1) if k in sections]
    if not candidates:
        return MatchResult(z, -1, "first", None, (0.0, 0.0), 0.0, textured, [])
    tried = []
    for inverted in (False, True):
        mov = this.inverted() if inverted else this
        for k in candidates:
            ref = prepared(sections, cache, k, config)
            if ref.textured_fraction < config.min_textured_fraction:
                continue
            tried.append(-k - 1 if inverted else k)
            coarse = estimate_translation(ref.image, mov.image, config.coarse, ref.mask, mov.mask)
            if not coarse.ok(config.coarse):
                continue
            result = estimate_flow(ref, mov, coarse.shift, config.flow)
            if result.valid_fraction >= config.min_valid_fraction:
                status = "inverted" if inverted else ("ok" if k == z - 1 else f"skipped to {k}")
                return MatchResult(z, k, status, result, coarse.shift, coarse.correlation, textured, tried)
    return MatchResult(z, -1, "unmatched", None, (0.0, 0.0), 0.0, textured, tried)


def overview_factor(section_shape: tuple[int, int], max_side: int = 4096) -> int:
    """Block-mean factor that brings a big section to at most `max_side` px for the whole-section
    decisions (blank test, coarse translation) of `match_section_tiled`."""
    return max(1, -(-max(section_shape) // max_side))


def match_section_tiled(read: Callable[[int, int, int, int, int], np.ndarray], overviews: dict[int, np.ndarray],
                        factor: int, z: int, section_shape: tuple[int, int], config: AlignConfig) -> MatchResult:
    """`match_section` for sections too big to hold: decisions on block-mean overviews
    (`overviews[k]`, `factor` px per overview pixel), flow tile by tile on full-resolution
    windows read with `read(k, y0, y1, x0, x1)` (zero outside the section)."""
    from dataclasses import replace

    from exaconnect.align.flow import estimate_flow_tiled, section_mask

    masks = {k: section_mask(v) for k, v in overviews.items()}
    textured = float(masks[z].mean())
    if textured < config.min_textured_fraction:
        return MatchResult(z, -1, "blank", None, (0.0, 0.0), 0.0, textured, [])
    candidates = [k for k in range(z - 1, z - 1 - config.max_skip, -1) if k in overviews]
    if not candidates:
        return MatchResult(z, -1, "first", None, (0.0, 0.0), 0.0, textured, [])
    coarse_config = replace(config.coarse, downsample=max(1, config.coarse.downsample // factor))
    tried = []
    for inverted in (False, True):
        def read_mov(y0, y1, x0, x1, _inv=inverted):
            window = np.asarray(read(z, y0, y1, x0, x1), dtype=np.float32)
            return np.where(window > 0, 255.0 - window, 0.0) if _inv else window

        overview = np.where(overviews[z] > 0, 255.0 - overviews[z], 0.0) if inverted else overviews[z]
        for k in candidates:
            if masks[k].mean() < config.min_textured_fraction:
                continue
            tried.append(-k - 1 if inverted else k)
            coarse = estimate_translation(overviews[k], overview, coarse_config, masks[k], masks[z])
            if not coarse.ok(coarse_config):
                continue
            shift = (coarse.shift[0] * factor, coarse.shift[1] * factor)
            result = estimate_flow_tiled(lambda *w, _k=k: read(_k, *w), read_mov, section_shape, shift, config.flow)
            if result.valid_fraction >= config.min_valid_fraction:
                status = "inverted" if inverted else ("ok" if k == z - 1 else f"skipped to {k}")
                return MatchResult(z, k, status, result, shift, coarse.correlation, textured, tried)
    return MatchResult(z, -1, "unmatched", None, (0.0, 0.0), 0.0, textured, tried)


def finalize_meshes(block_meshes: list[tuple[int, dict[int, np.ndarray]]], section_shape: tuple[int, int],
                    statuses: dict[int, str], config: SpringMeshConfig, info: dict | None = None) -> dict[int, np.ndarray]:
    """Compose block solutions, apply the drift prior (SpringMeshConfig.drift_prior) and remove what is
    common to the stack (SpringMeshConfig.detrend). `info`, if given, receives what the prior did."""
    from exaconnect.align.mesh import input_misalignment

    meshes = compose_blocks(block_meshes, config.stride)
    identity = identity_mesh(section_shape, config.stride)
    usable = [z for z, s in statuses.items() if s not in ("blank", "unmatched")]
    window = None
    if config.drift_prior == "highpass":
        window = drift_window_for(meshes, identity, usable, config)
        meshes = remove_drift(meshes, identity, usable, window)
    if info is not None:
        info.update({"drift_prior": config.drift_prior, "window_sections": window,
                     "window_choice": "fixed" if config.drift_window > 0 else "per stack",
                     "input_misalignment_px": input_misalignment(compose_blocks(block_meshes, config.stride), identity, usable)})
    return detrend_meshes(meshes, identity, usable, config.detrend)


def solve_in_memory(stack: np.ndarray, config: AlignConfig) -> tuple[list, dict[int, str], dict[int, MatchResult]]:
    """Flow and block meshes of a [z, y, x] stack: (blocks, statuses, matches), ready for
    `finalize_meshes` (which can be called again with another detrend)."""
    sections = {z: stack[z] for z in range(stack.shape[0])}
    masks: dict[int, np.ndarray] = {}
    matches = {z: match_section(sections, z, config, masks) for z in range(stack.shape[0])}
    flows = {z: m.section_flow() for z, m in matches.items()}
    shape = stack.shape[1:]
    references = {z: m.reference for z, m in matches.items()}
    statuses = {z: m.status for z, m in matches.items()}
    blocks = []
    for start, stop in block_ranges(stack.shape[0], config.mesh, references, statuses):
        meshes, _ = solve_block(flows, start, stop, shape, config.mesh)
        blocks.append((start, meshes))
    return blocks, statuses, matches


def align_in_memory(stack: np.ndarray, config: AlignConfig) -> tuple[dict[int, np.ndarray], dict[int, MatchResult]]:
    """Meshes for every section of a [z, y, x] stack, and the per-section match results."""
    blocks, statuses, matches = solve_in_memory(stack, config)
    return finalize_meshes(blocks, stack.shape[1:], statuses, config.mesh), matches
