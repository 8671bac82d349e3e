"""Elastic meshes: where each node of the output grid lies in each section.

A section's mesh is a regular grid of nodes (output pixels `stride * (i, j)`); its state `x[n]`
is the position (y, x) in that section's own pixels that output node n shows. Springs:
  * to targets: the reference section's node position carried through the flow field
    (`x_ref[n] + F(x_ref[n])`), weighted by whether that flow vector was valid;
  * in-plane: every pair of 4-neighbours resists a change of its difference vector relative
    to the section's best affine map (so rotation and scale cost nothing; bending does).
Linear springs make the equilibrium one sparse linear solve (the small-strain limit of the
Hookean mesh SOFIMA relaxes by integration); invalid regions are bridged by the in-plane springs
alone, which interpolates them harmonically from their surroundings.

Blocks of sections are solved independently, each starting from an identity mesh, and
composed afterwards (`compose_blocks`), with overlapping sections cross-faded for continuity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import splu

from exaconnect.errors import InputError
from exaconnect.precomputed.config_loader import load_dataclass
from exaconnect.align.coarse import apply_affine, fit_affine, fit_rigid
from exaconnect.align.flow import grid_points, sample_field


@dataclass(frozen=True)
class SpringMeshConfig:
    stride: int = 40
    # Ratio of in-plane stiffness to the stiffness of a spring to a valid target. Around 1 the
    # mesh follows distortions a few nodes wide and averages flow noise over ~3x3 nodes.
    in_plane_stiffness: float = 0.5
    # Sections are solved in blocks of this many (plus `block_overlap` shared with the previous
    # block) so that blocks run as separate tasks.
    block_size: int = 64
    block_overlap: int = 4
    # What part of the corrections common to the whole stack is removed after composition
    # (see detrend_meshes): "mean", "linear" or "none".
    detrend: str = "mean"
    # The shape in-plane springs return to: "rigid" (a section is not stretched when imaged, so
    # any strain costs energy) or "affine" (scale and shear are free, for sections that shrink).
    rest_shape: str = "rigid"
    # The drift prior (see `remove_drift`): "highpass" removes, node by node, the part of the
    # composed displacements that varies slowly along z, which image matching cannot tell from
    # the apparent motion of oblique neurites; "none" keeps it.
    drift_prior: str = "highpass"
    # Width of that high-pass: the Gaussian sigma, in sections, of the local-linear smoother whose
    # output is removed. 0 chooses it per stack (`drift_window_for`): the input's own per-section
    # misalignment divided by `drift_step`, the smoothing length of the optimal (Wiener) separation
    # of white misalignment from random-walk drift, clipped to [`drift_window_min`,
    # `drift_window_max`]. A fixed window trades leaking the slow part of a real misalignment into
    # neighbour errors (small windows) against letting more drift through (large windows).
    drift_window: float = 0.0
    # Standard deviation (px) of the apparent motion's change from one section to the next
    # (FIB-25: 0.2 px for whole-section translation, ~0.3 px node by node).
    drift_step: float = 0.25
    drift_window_min: float = 1.0
    drift_window_max: float = 64.0

    def __post_init__(self) -> None:
        if self.stride < 2 or self.in_plane_stiffness <= 0:
            raise InputError(f"mesh stride {self.stride} / stiffness {self.in_plane_stiffness}: expected >= 2 / > 0")
        if self.block_size < 2 or not 0 <= self.block_overlap < self.block_size:
            raise InputError(f"mesh block_size {self.block_size} / overlap {self.block_overlap}: expected overlap < size")
        if self.rest_shape not in ("rigid", "affine"):
            raise InputError(f"mesh rest_shape {self.rest_shape!r}: expected 'rigid' or 'affine'")
        if self.detrend not in ("none", "mean", "linear"):
            raise InputError(f"mesh detrend {self.detrend!r}: expected 'none', 'mean' or 'linear'")
        if self.drift_prior not in ("none", "highpass"):
            raise InputError(f"mesh.drift_prior {self.drift_prior!r}: expected 'highpass' or 'none'")
        if self.drift_window < 0:
            raise InputError(f"mesh.drift_window {self.drift_window}: expected sections > 0, or 0 to choose per stack")
        if self.drift_step <= 0 or not 0 < self.drift_window_min <= self.drift_window_max:
            raise InputError(f"mesh.drift_step {self.drift_step} / drift_window_min {self.drift_window_min} / "
                             f"drift_window_max {self.drift_window_max}: expected step > 0 and 0 < min <= max")

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SpringMeshConfig":
        return load_dataclass(cls, data, "align.mesh")


def identity_mesh(section_shape: tuple[int, int], stride: int) -> np.ndarray:
    return grid_points(section_shape, stride)


def _laplacian(shape: tuple[int, int]) -> sp.csr_matrix:
    """Graph Laplacian of the 4-connected node grid."""
    gy, gx = shape
    index = np.arange(gy * gx).reshape(gy, gx)
    pairs = [(index[:, :-1].ravel(), index[:, 1:].ravel()), (index[:-1, :].ravel(), index[1:, :].ravel())]
    rows = np.concatenate([p[0] for p in pairs])
    cols = np.concatenate([p[1] for p in pairs])
    n = gy * gx
    adjacency = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    adjacency = adjacency + adjacency.T
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    return (sp.diags(degree) - adjacency).tocsr()


def relax_mesh(rest: np.ndarray, targets: np.ndarray, weights: np.ndarray, config: SpringMeshConfig) -> np.ndarray:
    """Equilibrium node positions [gy, gx, 2] for springs to `targets` (weights in [0, 1]) and
    in-plane springs around the best affine map of `rest` (output node coordinates) to targets."""
    shape = rest.shape[:2]
    w = weights.reshape(-1).astype(float)
    if not (w > 0).any():
        raise InputError("mesh: no valid target; the caller must handle unmatched sections")
    if config.rest_shape == "rigid":
        affine = fit_rigid(rest.reshape(-1, 2), targets.reshape(-1, 2), w)
    else:
        affine = fit_affine(rest.reshape(-1, 2), targets.reshape(-1, 2), w)
    base = apply_affine(affine, rest.reshape(-1, 2))
    residual = targets.reshape(-1, 2) - base
    system = sp.diags(w) + config.in_plane_stiffness * _laplacian(shape)
    # Nodes with no valid target anywhere in their component would be singular; a tiny tie to
    # the affine keeps the system definite without pulling valid regions.
    system = system + sp.diags(np.full(len(w), 1e-6))
    rhs = w[:, None] * residual
    # One factorisation for both coordinates (the system is the same for y and x).
    u = splu(system.tocsc()).solve(np.ascontiguousarray(rhs))
    return (base + u).reshape(*shape, 2)


def mesh_targets(reference_mesh: np.ndarray, flow: np.ndarray, valid: np.ndarray, flow_stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the reference's nodes land in the moving section, and how trustworthy each is
    (bilinear share of valid flow vectors around the node)."""
    displacement = sample_field(flow, flow_stride, reference_mesh)
    weight = sample_field(valid[..., None].astype(float), flow_stride, reference_mesh)[..., 0]
    # A node interpolated partly from filled-in (invalid) vectors is not trusted at all.
    weight = np.where(weight > 0.99, 1.0, 0.0)
    return reference_mesh + displacement, weight


@dataclass
class SectionFlow:
    """What the flow stage found for one section (plain arrays, as stored on disk)."""

    z: int
    reference: int  # -1: no reference (first section, blank, or unmatched)
    status: str  # ok | first | blank | unmatched | inverted
    flow: np.ndarray | None
    valid: np.ndarray | None
    flow_stride: int


def solve_block(flows: dict[int, SectionFlow], z_start: int, z_stop: int, section_shape: tuple[int, int],
                config: SpringMeshConfig) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Meshes of sections z_start..z_stop-1 in the frame of section z_start (identity there).

    A section without a usable flow keeps the mesh of the last solved section, so one bad
    section never displaces the ones after it. Returns (meshes, per-section notes).
    """
    identity = identity_mesh(section_shape, config.stride)
    meshes: dict[int, np.ndarray] = {}
    notes: dict[int, str] = {}
    last = identity
    for z in range(z_start, z_stop):
        info = flows.get(z)
        if z == z_start:
            meshes[z] = identity
            notes[z] = "anchor"
            continue
        if info is None or info.reference < 0 or info.flow is None:
            meshes[z] = last
            notes[z] = f"kept previous mesh ({info.status if info else 'no flow'})"
            continue
        ref = info.reference
        if ref in meshes:
            ref_mesh = meshes[ref]
        else:
            # The reference lies before this block: its relation to the anchor is unknown here;
            # assume the anchor's (identity) and let the overlap cross-fade absorb the difference.
            ref_mesh = identity
            notes[z] = f"reference {ref} outside block; anchored"
        targets, weights = mesh_targets(ref_mesh, info.flow, info.valid, info.flow_stride)
        if weights.sum() < 3:
            meshes[z] = last
            notes[z] = "too few valid targets; kept previous mesh"
            continue
        meshes[z] = relax_mesh(identity, targets, weights, config)
        notes.setdefault(z, "ok")
        last = meshes[z]
    return meshes, notes


def block_ranges(num_sections: int, config: SpringMeshConfig, references: dict[int, int] | None = None,
                 statuses: dict[int, str] | None = None) -> list[tuple[int, int]]:
    """[start, stop) of each block; every block after the first starts `block_overlap`
    sections before the previous one ends.

    Given the flow stage's references and statuses, a block's first section (its anchor) is
    moved back (or, failing that, forward) within the previous block to a section that matched
    its predecessor normally and that no later section of the block skips over: the block is
    solved in the anchor's frame, so a section whose reference lies before the anchor could not
    be placed."""
    references = references or {}
    statuses = statuses or {}

    def good_anchor(s: int, stop: int) -> bool:
        if statuses.get(s, "ok") not in ("ok", "first"):
            return False
        return all(references.get(z, z - 1) >= s or references.get(z, z - 1) < 0 for z in range(s + 1, stop))

    ranges: list[tuple[int, int]] = []
    start = 0
    while True:
        stop = min(num_sections, start + config.block_size)
        ranges.append((start, stop))
        if stop >= num_sections:
            return ranges
        nominal = max(stop - config.block_overlap - 1, start + 1)
        candidates = list(range(nominal, start, -1)) + list(range(nominal + 1, stop))
        next_stop = lambda s: min(num_sections, s + config.block_size)  # noqa: E731
        start = next((s for s in candidates if good_anchor(s, next_stop(s))), nominal)


def compose(outer: np.ndarray, inner: np.ndarray, stride: int) -> np.ndarray:
    """inner ∘ outer: node n maps to `inner` evaluated at `outer[n]` (both grids of one stride).
    The inner mesh is split into its least-squares affine part, evaluated exactly anywhere, and
    a non-rigid remainder interpolated bilinearly (constant beyond the grid): positions beyond
    the grid, which a large drift correction produces, then follow the mesh's rotation and scale
    instead of a clamped displacement."""
    identity = grid_points(((inner.shape[0] - 1) * stride + 1, (inner.shape[1] - 1) * stride + 1), stride)
    design = np.hstack([identity.reshape(-1, 2), np.ones((identity[..., 0].size, 1))])
    solution, *_ = np.linalg.lstsq(design, inner.reshape(-1, 2), rcond=None)
    remainder = inner - (design @ solution).reshape(inner.shape)
    flat = outer.reshape(-1, 2)
    affine = (np.hstack([flat, np.ones((len(flat), 1))]) @ solution).reshape(outer.shape)
    return affine + sample_field(remainder, stride, outer)


def compose_blocks(block_meshes: list[tuple[int, dict[int, np.ndarray]]], stride: int) -> dict[int, np.ndarray]:
    """Stack-wide meshes from per-block meshes. Block b's anchor section also belongs to block
    b-1; its global mesh G carries block b's frame into the global one (global = local ∘ G).
    Overlap sections are cross-faded linearly from the previous block's solution to this one's."""
    result: dict[int, np.ndarray] = {}
    for start, meshes in block_meshes:
        if not result:
            result.update(meshes)
            continue
        anchor = result[start]
        overlap = sorted(z for z in meshes if z in result and z != start)
        for z in sorted(meshes):
            local = compose(anchor, meshes[z], stride)
            if z in overlap:
                t = (overlap.index(z) + 1) / (len(overlap) + 1)
                result[z] = (1 - t) * result[z] + t * local
            elif z != start:
                result[z] = local
    return result


def detrend_meshes(meshes: dict[int, np.ndarray], identity: np.ndarray, usable: list[int], mode: str) -> dict[int, np.ndarray]:
    """Remove, per node, the part of the displacement (mesh - identity) that is common to the
    stack, fitted over `usable` sections:
      "mean":   the average over z. The first section of a stack is the frame every other one
                is chained to, so its own distortion would otherwise be copied into all of them;
                after this the average section keeps its acquired geometry.
      "linear": the least-squares line in z (mean and tilt), for near-aligned stacks such as
                FIB-SEM, where chaining through oblique neurites (FIB-25: ~0.25 px and ~0.1
                degrees per section) would otherwise shear the volume.
      "none":   nothing; the stack stays in the first section's frame.
    """
    if mode == "none" or not usable:
        return dict(meshes)
    zs = np.array(sorted(usable), float)
    disp = np.stack([meshes[int(z)] - identity for z in zs])
    mean = disp.mean(axis=0)
    slope = np.zeros_like(mean)
    if mode == "linear" and len(zs) >= 3:
        zc = zs - zs.mean()
        slope = np.tensordot(zc, disp, axes=(0, 0)) / (zc @ zc)
    # The common part is removed in the *output* frame (every section's mesh evaluated at
    # n - common(n)), not subtracted from the section positions: sections are rotated relative
    # to each other, so one shift in section pixels would be a different shift in each output.
    stride = int(identity[0, 1, 1] - identity[0, 0, 1]) if identity.shape[1] > 1 else 1
    return {z: compose(identity - (mean + (z - zs.mean()) * slope), m, stride) for z, m in meshes.items()}


def local_linear_weights(targets: np.ndarray, sources: np.ndarray, sigma: float) -> np.ndarray:
    """Rows of a local-linear Gaussian smoother: value at each target z = the intercept of a
    weighted least-squares line through the source values (weights exp(-dz^2 / 2 sigma^2)).
    Unlike a plain Gaussian mean it reproduces a linear trend exactly, also at the ends of the
    stack, so a steady drift is removed entirely and not only in the middle."""
    t = np.asarray(targets, float)[:, None]
    d = np.asarray(sources, float)[None, :] - t
    w = np.exp(-0.5 * (d / sigma) ** 2)
    s0, s1, s2 = w.sum(axis=1), (w * d).sum(axis=1), (w * d * d).sum(axis=1)
    det = s0 * s2 - s1 * s1
    # One source (or all at one z): the line is undetermined; fall back to the weighted mean.
    flat = det <= 1e-9 * np.maximum(s0 * s2, 1e-12)
    weights = np.where(flat[:, None], w / s0[:, None], w * (s2[:, None] - s1[:, None] * d) / np.where(flat, 1, det)[:, None])
    return weights


def input_misalignment(meshes: dict[int, np.ndarray], identity: np.ndarray, usable: list[int]) -> float:
    """The input's per-section misalignment (px), as seen in the composed displacements: the RMS
    second difference along z over consecutive usable sections, divided by sqrt(6) (the factor for
    independent offsets). Drift, being smooth in z, hardly enters it. RMS rather than a robust
    spread, so that a few large jumps lengthen the window instead of being smoothed away."""
    zs = sorted(usable)
    if len(zs) < 3:
        return 0.0
    disp = np.stack([meshes[int(z)] - identity for z in zs])
    second = disp[2:] - 2 * disp[1:-1] + disp[:-2]
    return float(np.sqrt(np.mean(second**2) / 6.0))


def drift_window_for(meshes: dict[int, np.ndarray], identity: np.ndarray, usable: list[int], config: SpringMeshConfig) -> float:
    """The high-pass window (sections) the drift prior uses for this stack (SpringMeshConfig.drift_window)."""
    if config.drift_window > 0:
        return float(config.drift_window)
    window = input_misalignment(meshes, identity, usable) / config.drift_step
    return float(np.clip(window, config.drift_window_min, config.drift_window_max))


def remove_drift(meshes: dict[int, np.ndarray], identity: np.ndarray, usable: list[int], window: float,
                 iterations: int = 8) -> dict[int, np.ndarray]:
    """The drift prior: per node, the displacement (mesh - identity) of every section is split
    into a slow part along z (a local-linear Gaussian smoother of sigma `window` sections over the
    `usable` sections) and the rest, and the slow part is removed in the output frame.

    Why: chaining image matches integrates whatever the sections show as motion. In FIB-25 the
    oblique neurites look like a steady ~0.25 px, 0.09 degree and 0.1 % scale change per section,
    which chained over 250 sections bends the stack by ~45 px; a real misalignment (stage jumps,
    section distortion) changes from one section to the next. The high-pass keeps the latter and
    removes the former. It removes, too, the slow part of a real misalignment: with independent
    offsets of standard deviation s per section, neighbours differ afterwards by about
    s / (2.7 window^1.5) (0.2 px for 23 px and window 16); and what it leaves of the drift grows
    with the window, as a random walk of the apparent motion's fluctuations (FIB-25: ~0.2 px per
    section). Hence `drift_window_for`: long windows for badly misaligned input, short ones for an
    input that is already aligned, which then comes out essentially unchanged."""
    if not usable:
        return dict(meshes)
    zs = np.array(sorted(usable))
    targets = [int(z) for z in sorted(meshes)]
    index = {z: i for i, z in enumerate(targets)}
    weights = local_linear_weights(np.array(targets), zs, window)
    stride = int(identity[0, 1, 1] - identity[0, 0, 1]) if identity.shape[1] > 1 else 1
    # The correction is a warp of the output frame, psi_z, smooth along z (so neighbours get the
    # same one and keep their relative geometry): find psi_z with slow(mesh_z(psi_z) - identity)
    # = 0 by fixed-point steps psi <- psi - slow(...). A single step, psi = identity - slow, is
    # off by (drift gradient) x (drift): ~8 px for FIB-25's 45 px of drift with its rotation;
    # each step shrinks that by the gradient (~0.2).
    psi = np.broadcast_to(identity, (len(targets), *identity.shape)).copy()
    out = {z: meshes[z] for z in targets}
    for _ in range(iterations):
        disp = np.stack([out[int(z)] - identity for z in zs]).reshape(len(zs), -1)
        low = (weights @ disp).reshape(len(targets), *identity.shape)
        psi -= low
        out = {z: compose(psi[index[z]], meshes[z], stride) for z in targets}
        if np.abs(low).max() < 1e-3:
            break
    return out
