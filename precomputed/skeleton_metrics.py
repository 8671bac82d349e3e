"""Skeleton metrics of a segmentation: expected run length (ERL), merging segments, split and
omitted skeleton edges, scored against ground-truth skeletons.

The rules are funlib.evaluate's (`run_length.evaluate_skeletons`), which the FFN papers report:
each skeleton edge is judged by the segments of its two nodes, in this order

- omitted: either node lies in label 0 (no segment claims it);
- split: the nodes lie in two different non-zero segments;
- merged: both nodes lie in one segment that touches two or more skeletons;
- correct: otherwise.

A skeleton's run length is the sum over segments of (correct length in that segment)^2 divided
by the skeleton's length: the expected length of correctly segmented skeleton one walks along
from a point picked uniformly on the skeleton. The ERL is the mean of that over skeletons
weighted by skeleton length, so its upper bound (a perfect segmentation) is
sum(length^2) / sum(length).

The strict rule lets one stray node make a segment a merger. With `merge_min_nodes=K` a segment
touches a skeleton only where at least K of that skeleton's nodes lie in it, and only those
(skeleton, segment) pairs count as merged (the lenient rule). K=1 is funlib's rule.

Everything here is a plain function of arrays; reading skeleton layers and running kimimaro on
ground-truth labels are separate functions at the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from exaconnect.errors import InputError, LayerError


@dataclass(frozen=True)
class Skeleton:
    """One skeleton: `vertices` (N, 3) as x, y, z and `edges` (E, 2) indices into them."""

    vertices: np.ndarray
    edges: np.ndarray


@dataclass(frozen=True)
class KimimaroParameters:
    """TEASAR parameters for skeletons made from ground-truth labels. `scale` and `const` (nm)
    set the invalidation radius around the path (scale * boundary distance + const); bodies
    under `dust_threshold` voxels get no skeleton; `anisotropy` is the voxel size in nm, x y z."""

    scale: float = 1.5
    const: float = 300.0
    dust_threshold: int = 100
    anisotropy: tuple[float, float, float] = (10.0, 10.0, 10.0)
    pdrf_scale: float = 100000.0
    pdrf_exponent: int = 4
    fix_branching: bool = True
    fix_borders: bool = True

    def to_dict(self) -> dict:
        record = asdict(self)
        record["anisotropy"] = list(self.anisotropy)
        return record


@dataclass(frozen=True)
class SkeletonMetrics:
    """Scores of one segmentation against a set of skeletons; lengths in the vertices' unit."""

    erl: float
    erl_max: float
    skeleton_count: int
    skeleton_length: float
    edges: int
    omitted_edges: int
    split_edges: int
    merged_edges: int
    correct_edges: int
    omitted_length: float
    split_length: float
    merged_length: float
    correct_length: float
    merging_segments: int
    merged_skeletons: int
    edges_outside: int
    merge_min_nodes: int
    run_lengths: dict[int, float] = field(repr=False, default_factory=dict)

    @property
    def omitted_fraction(self) -> float:
        return self.omitted_edges / self.edges if self.edges else 0.0

    def to_dict(self, prefix: str = "skeleton_") -> dict:
        """JSON-ready scores (per-skeleton run lengths left out)."""
        record = {k: v for k, v in asdict(self).items() if k != "run_lengths"}
        record["omitted_fraction"] = self.omitted_fraction
        record["omitted_length_fraction"] = self.omitted_length / self.skeleton_length if self.skeleton_length else 0.0
        return {(k if k.startswith(("erl", "skeleton")) else prefix + k): v for k, v in record.items()}


def vertex_voxels(vertices: np.ndarray, resolution: Sequence[float]) -> np.ndarray:
    """Voxel index (x, y, z) of physical vertices.

    kimimaro and igneous put a vertex at index * resolution; others put it at the voxel centre,
    (index + 0.5) * resolution. Rounding half down maps both conventions to the same voxel and
    is safe against float error either way.
    """
    scaled = np.asarray(vertices, dtype=np.float64) / np.asarray(resolution, dtype=np.float64)
    return np.floor(scaled + 0.5 - 1e-6).astype(np.int64)


def _check_skeleton(skeleton_id: int, skeleton: Any) -> tuple[np.ndarray, np.ndarray]:
    vertices = np.asarray(skeleton.vertices, dtype=np.float64).reshape(-1, 3) if len(skeleton.vertices) else np.zeros((0, 3))
    edges = np.asarray(skeleton.edges, dtype=np.int64).reshape(-1, 2) if len(skeleton.edges) else np.zeros((0, 2), np.int64)
    if edges.size and (edges.min() < 0 or edges.max() >= len(vertices)):
        raise InputError(f"skeleton {skeleton_id}: an edge refers to vertex {int(edges.max())} but it has "
                         f"{len(vertices)} vertices; expected edges indexing its vertices")
    if not np.isfinite(vertices).all():
        raise InputError(f"skeleton {skeleton_id}: vertices hold NaN or infinity; expected finite coordinates")
    return vertices, edges


def skeleton_metrics(
    skeletons: Mapping[int, Any],
    segmentation: np.ndarray,
    resolution: Sequence[float] = (1.0, 1.0, 1.0),
    offset: Sequence[int] = (0, 0, 0),
    vertex_unit: str = "physical",
    merge_min_nodes: int = 1,
) -> SkeletonMetrics:
    """Score `segmentation` ([z, y, x], its first voxel at `offset`, x y z voxels) against
    `skeletons` ({id: object with .vertices (N, 3) x y z and .edges (E, 2)}).

    Vertices are physical (`vertex_unit="physical"`, divided by `resolution` to find their voxel)
    or global voxel coordinates (`"voxel"`). Lengths are physical either way (voxel vertices are
    scaled by `resolution`). Edges with a node outside the segmentation's box are left out of
    every figure (counted as `edges_outside`), so a box scores the skeleton pieces inside it.
    """
    if segmentation.ndim != 3:
        raise InputError(f"segmentation has shape {segmentation.shape}; expected a 3-d [z, y, x] array")
    if not np.issubdtype(segmentation.dtype, np.integer):
        raise InputError(f"segmentation has dtype {segmentation.dtype}; expected integer labels")
    if vertex_unit not in ("physical", "voxel"):
        raise InputError(f"vertex_unit {vertex_unit!r}; expected 'physical' or 'voxel'")
    if int(merge_min_nodes) < 1:
        raise InputError(f"merge_min_nodes {merge_min_nodes}; expected an integer >= 1")
    resolution = np.asarray(resolution, dtype=np.float64)
    if resolution.shape != (3,) or (resolution <= 0).any():
        raise InputError(f"resolution {resolution.tolist()}; expected three positive numbers (x, y, z)")
    offset = np.asarray(offset, dtype=np.int64)
    shape_xyz = np.asarray(segmentation.shape[::-1], dtype=np.int64)

    # One flat graph over all skeletons: node arrays indexed by a global node number.
    node_skeleton, node_label, node_inside = [], [], []
    edge_u, edge_v, edge_length = [], [], []
    skeleton_ids = []
    base = 0
    for sid, skeleton in skeletons.items():
        vertices, edges = _check_skeleton(int(sid), skeleton)
        if vertex_unit == "physical":
            voxels, physical = vertex_voxels(vertices, resolution), vertices
        else:
            voxels, physical = np.floor(vertices + 0.5 - 1e-6).astype(np.int64), vertices * resolution
        local = voxels - offset
        inside = ((local >= 0) & (local < shape_xyz)).all(axis=1)
        labels = np.zeros(len(vertices), dtype=np.uint64)
        labels[inside] = segmentation[local[inside, 2], local[inside, 1], local[inside, 0]]
        skeleton_ids.append(int(sid))
        node_skeleton.append(np.full(len(vertices), len(skeleton_ids) - 1, dtype=np.int64))
        node_label.append(labels)
        node_inside.append(inside)
        edge_u.append(edges[:, 0] + base)
        edge_v.append(edges[:, 1] + base)
        edge_length.append(np.linalg.norm(physical[edges[:, 0]] - physical[edges[:, 1]], axis=1))
        base += len(vertices)

    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    node_skeleton, node_label = cat(node_skeleton, np.int64), cat(node_label, np.uint64)
    node_inside = cat(node_inside, bool)
    u, v, length = cat(edge_u, np.int64), cat(edge_v, np.int64), cat(edge_length, np.float64)

    # Dense segment numbers (0 stays 0 when present) keep pair keys small whatever the label width.
    segment_ids, node_segment = np.unique(node_label, return_inverse=True)
    node_segment = node_segment.ravel().astype(np.int64)
    if not (segment_ids.size and segment_ids[0] == 0):
        node_segment += 1  # no node in label 0: dense numbers start at 1
    segments_total = int(node_segment.max(initial=0)) + 1

    kept = node_inside[u] & node_inside[v]
    edges_outside = int((~kept).sum())
    u, v, length = u[kept], v[kept], length[kept]
    edge_skeleton = node_skeleton[u]
    segment_u, segment_v = node_segment[u], node_segment[v]

    # Which (skeleton, segment) pairs touch: at least merge_min_nodes nodes of the skeleton in it.
    counted = node_inside & (node_segment != 0)
    pair_nodes = node_skeleton[counted] * segments_total + node_segment[counted]
    pair_keys, node_counts = np.unique(pair_nodes, return_counts=True)
    touching = pair_keys[node_counts >= int(merge_min_nodes)]
    segments, skeletons_per_segment = np.unique(touching % segments_total, return_counts=True)
    merging = segments[skeletons_per_segment >= 2]
    merged_pairs = touching[np.isin(touching % segments_total, merging)]

    omitted = (segment_u == 0) | (segment_v == 0)
    split = ~omitted & (segment_u != segment_v)
    same = ~omitted & ~split
    # An edge is merged when its (skeleton, segment) pair is one of a merging segment's pairs.
    merged = same & np.isin(edge_skeleton * segments_total + segment_u, merged_pairs)
    correct = same & ~merged

    n_skeletons = len(skeleton_ids)
    skeleton_length = np.bincount(edge_skeleton, weights=length, minlength=n_skeletons)
    total = float(skeleton_length.sum())
    erl = 0.0
    if correct.any():
        # correct length per (skeleton, segment), squared, summed per skeleton
        keys, inverse = np.unique(edge_skeleton[correct] * segments_total + segment_u[correct], return_inverse=True)
        per_pair = np.bincount(inverse.ravel(), weights=length[correct])
        squared = np.bincount(keys // segments_total, weights=per_pair**2, minlength=n_skeletons)
        erl = float(squared.sum() / total)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_skeleton = np.where(skeleton_length > 0, squared / skeleton_length, 0.0)
    else:
        per_skeleton = np.zeros(n_skeletons)
    run_lengths = {sid: float(per_skeleton[i]) for i, sid in enumerate(skeleton_ids)}
    return SkeletonMetrics(
        erl=erl,
        erl_max=float((skeleton_length**2).sum() / total) if total else 0.0,
        skeleton_count=int((skeleton_length > 0).sum()),
        skeleton_length=total,
        edges=int(len(length)),
        omitted_edges=int(omitted.sum()),
        split_edges=int(split.sum()),
        merged_edges=int(merged.sum()),
        correct_edges=int(correct.sum()),
        omitted_length=float(length[omitted].sum()),
        split_length=float(length[split].sum()),
        merged_length=float(length[merged].sum()),
        correct_length=float(length[correct].sum()),
        merging_segments=int(len(merging)),
        merged_skeletons=int(len(np.unique(merged_pairs // segments_total))),
        edges_outside=edges_outside,
        merge_min_nodes=int(merge_min_nodes),
        run_lengths=run_lengths,
    )


# ---------------------------------------------------------------- where ground-truth skeletons come from


def skeletonize_labels(
    labels: np.ndarray,
    parameters: KimimaroParameters = KimimaroParameters(),
    offset: Sequence[int] = (0, 0, 0),
    parallel: int = 1,
    progress: bool = False,
) -> dict[int, Skeleton]:
    """kimimaro TEASAR skeletons of every body of `labels` ([z, y, x], first voxel at `offset`,
    x y z) with physical vertices (nm: global voxel index * anisotropy), keyed by label."""
    import kimimaro

    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"ground-truth labels have shape {labels.shape} and dtype {labels.dtype}; "
                         "expected a 3-d integer [z, y, x] array")
    anisotropy = tuple(float(a) for a in parameters.anisotropy)
    # The transposed view is x, y, z in Fortran order, the layout kimimaro works in without a copy.
    skeletons = kimimaro.skeletonize(
        labels.transpose(2, 1, 0),
        teasar_params={"scale": parameters.scale, "const": parameters.const,
                       "pdrf_scale": parameters.pdrf_scale, "pdrf_exponent": parameters.pdrf_exponent},
        anisotropy=anisotropy,
        dust_threshold=int(parameters.dust_threshold),
        fix_branching=parameters.fix_branching,
        fix_borders=parameters.fix_borders,
        progress=progress,
        parallel=parallel,
    )
    shift = np.asarray(offset, dtype=np.float64) * np.asarray(anisotropy)
    return {int(sid): Skeleton(np.asarray(s.vertices, dtype=np.float64) + shift, np.asarray(s.edges, dtype=np.int64))
            for sid, s in skeletons.items()}


def read_skeleton_layer(path: str, ids: Iterable[int] | None = None) -> dict[int, Skeleton]:
    """Skeletons of a segmentation layer's precomputed skeleton source (the layer's info names it
    under "skeletons"), vertices in nm. `ids` picks bodies; by default every skeleton listed."""
    from exaconnect.precomputed.layers import layer_url, open_layer

    url = layer_url(path)
    vol = open_layer(url, layer_type="segmentation")
    if not vol.info.get("skeletons"):
        raise LayerError(f"layer {url} has no skeletons (its info has no 'skeletons' entry); expected a "
                         "segmentation layer with a precomputed skeleton source, e.g. from `exaconnect skeleton run`")
    if ids is None:
        ids = _list_skeleton_ids(vol)
    ids = [int(i) for i in ids if int(i) != 0]
    if not ids:
        return {}
    try:
        if vol.skeleton.meta.is_sharded():
            found = vol.skeleton.get(ids)
        else:
            found = vol.skeleton.get(ids, allow_missing=True)
    except Exception as error:  # cloud-volume raises SkeletonDecodeError and storage errors alike
        raise LayerError(f"skeletons of layer {url} could not be read: {error}") from error
    return {int(s.id): Skeleton(np.asarray(s.vertices, dtype=np.float64), np.asarray(s.edges, dtype=np.int64))
            for s in found if len(s.vertices)}


def _list_skeleton_ids(vol) -> list[int]:
    if vol.skeleton.meta.is_sharded():
        return [int(i) for i in vol.skeleton.list()]
    from cloudfiles import CloudFiles

    # Unsharded skeletons are one file per body named by its id, beside the source's info file.
    names = CloudFiles(vol.meta.join(vol.cloudpath, vol.skeleton.meta.skeleton_path)).list()
    return sorted(int(n) for n in (name.rsplit("/", 1)[-1] for name in names) if n.isdigit())
