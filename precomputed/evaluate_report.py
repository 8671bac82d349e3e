"""Evaluate a segmentation layer against a ground-truth layer: JSON scores and a PNG figure.

Voxel scores (VI, adapted Rand error) always; skeleton scores (expected run length, merging
segments, split and omitted edges) when ground-truth skeletons are given, either a precomputed
skeleton layer or kimimaro skeletons made here from the ground-truth labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from exaconnect.errors import InputError
from exaconnect.precomputed.bbox import Box, require_inside
from exaconnect.precomputed.baselines import WatershedParameters, baseline_scores
from exaconnect.precomputed.evaluate import contingency_table, segmentation_metrics
from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box
from exaconnect.precomputed.skeleton_metrics import (
    KimimaroParameters,
    read_skeleton_layer,
    skeleton_metrics,
    skeletonize_labels,
)


@dataclass(frozen=True)
class LabelVolume:
    """Labels [z, y, x] with the global voxel (x, y, z) of their first voxel, and the voxel size
    in nm when the source records one (a layer does; .npy/.npz/.h5 files do not)."""

    labels: np.ndarray
    offset: tuple[int, int, int]
    resolution: tuple[float, float, float] | None


@dataclass(frozen=True)
class SkeletonOptions:
    """Where ground-truth skeletons come from (`layer`, or `kimimaro` on the ground-truth labels;
    its anisotropy is replaced by the voxel size), the lenient merge rule's `merge_min_nodes`,
    and the voxel size in nm for sources that carry none."""

    layer: str | None = None
    kimimaro: KimimaroParameters | None = None
    merge_min_nodes: int = 1
    resolution: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if (self.layer is None) == (self.kimimaro is None):
            raise InputError("skeleton scores need exactly one source: a skeleton layer (--skeletons) "
                             "or kimimaro on the ground truth (--skeletonize-groundtruth)")


def read_labels(spec: str, bbox: Box | None) -> LabelVolume:
    """Labels from a layer, or from a `.npy`/`.npz` file (array `segmentation`) or `file.h5:dataset`
    (a file's first voxel is global voxel 0,0,0)."""
    from exaconnect.precomputed.sources import open_source

    text = str(spec)
    if text.endswith(".npz"):
        with np.load(text) as f:
            array = f[f.files[0]] if "segmentation" not in f.files else f["segmentation"]
    elif text.endswith(".npy") or ".h5:" in text:
        source = open_source(text)
        array = source.read_slab(0, source.shape[0])
    else:
        vol = open_layer(text, layer_type="segmentation")
        box = bbox or layer_bounds(vol)
        require_inside(box, layer_bounds(vol), f"--bbox for layer {text}")
        resolution = tuple(float(r) for r in vol.meta.resolution(0))
        return LabelVolume(read_box(vol, box), box.start, resolution)  # type: ignore[arg-type]
    if bbox is not None:
        require_inside(bbox, Box.from_shape(array.shape[::-1]), f"--bbox for {text}")
        (x0, y0, z0), (x1, y1, z1) = bbox.start, bbox.stop
        array = array[z0:z1, y0:y1, x0:x1]
    return LabelVolume(array, bbox.start if bbox else (0, 0, 0), None)


def _voxel_size(named: dict[str, tuple[float, float, float] | None], given: tuple[float, float, float] | None):
    """The one voxel size that every source agrees on: --resolution wins over the layers' own,
    which must agree with each other."""
    if given is not None:
        return tuple(float(r) for r in given)
    known = {name: tuple(r) for name, r in named.items() if r is not None}
    if not known:
        raise InputError("skeleton scores need the voxel size: the segmentation, ground truth and skeletons "
                         "are files without one; pass --resolution X,Y,Z (nm)")
    first_name, first = next(iter(known.items()))
    for name, resolution in known.items():
        if not np.allclose(resolution, first):
            raise InputError(f"{name} has resolution {list(resolution)} nm but {first_name} has {list(first)} nm; "
                             "expected the same voxel size (pass --resolution to say which one is meant)")
    return first


def skeleton_scores(segmentation: LabelVolume, groundtruth: LabelVolume, options: SkeletonOptions) -> dict:
    """Skeleton scores of `segmentation` as JSON-ready fields, with where the skeletons came from."""
    named = {"the segmentation": segmentation.resolution, "the ground truth": groundtruth.resolution}
    if options.layer is not None:
        from exaconnect.precomputed.layers import layer_url

        skeleton_vol = open_layer(options.layer, layer_type="segmentation")
        named[f"skeleton layer {layer_url(options.layer)}"] = tuple(float(r) for r in skeleton_vol.meta.resolution(0))
        resolution = _voxel_size(named, options.resolution)
        skeletons = read_skeleton_layer(options.layer)
        source = {"layer": layer_url(options.layer)}
    else:
        resolution = _voxel_size(named, options.resolution)
        parameters = replace(options.kimimaro, anisotropy=resolution)
        skeletons = skeletonize_labels(groundtruth.labels, parameters, offset=groundtruth.offset)
        source = {"kimimaro": parameters.to_dict()}
    if not skeletons:
        raise InputError(f"no ground-truth skeletons from {source}; expected at least one skeleton to score")
    scores = skeleton_metrics(skeletons, segmentation.labels, resolution, segmentation.offset,
                              merge_min_nodes=options.merge_min_nodes)
    return {**scores.to_dict(), "skeleton_length_unit": "nm", "skeleton_source": source}


def write_figure(segmentation: np.ndarray, groundtruth: np.ndarray, metrics: dict, path: Path,
                 image: np.ndarray | None = None) -> None:
    """Left: per ground-truth body, how split (H(seg|body)) vs how much of it is merged away;
    right: the middle z slice with segment boundaries over ground-truth boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = contingency_table(segmentation, groundtruth)
    gt_ids, inverse = np.unique(table.groundtruth_ids, return_inverse=True)
    sizes = np.bincount(inverse, weights=table.counts)
    p = table.counts / sizes[inverse]
    split = np.bincount(inverse, weights=-p * np.log2(p))
    seg_ids, seg_inverse = np.unique(table.segment_ids, return_inverse=True)
    seg_sizes = np.bincount(seg_inverse, weights=table.counts)
    q = table.counts / seg_sizes[seg_inverse]
    merge_per_pair = -table.counts * np.log2(q)
    merge = np.bincount(inverse, weights=merge_per_pair) / np.maximum(sizes, 1)

    skeletons = "erl" in metrics
    fig, axes = plt.subplots(1, 3 if skeletons else 2, figsize=(15 if skeletons else 10, 4.5))
    ax0, ax1 = axes[0], axes[1]
    sc = ax0.scatter(split, merge, s=8 + 60 * sizes / sizes.max(), c=np.log10(sizes), cmap="viridis")
    ax0.set_xlabel("split entropy of body (bits)")
    ax0.set_ylabel("merge entropy per voxel (bits)")
    ax0.set_title(f"VI split {metrics['vi_split']:.3f}  merge {metrics['vi_merge']:.3f}  ARE {metrics['adapted_rand_error']:.3f}", fontsize=9)
    fig.colorbar(sc, ax=ax0, label="log10 body size")
    z = segmentation.shape[0] // 2
    from exaconnect.precomputed.synthetic import membrane_mask

    seg_edges = membrane_mask(segmentation[z : z + 1])[0]
    gt_edges = membrane_mask(groundtruth[z : z + 1])[0]
    if image is not None:  # any dtype: stretched to the slice's range
        base = image[z].astype(float) - float(image[z].min())
        base /= max(float(base.max()), 1e-9)
    else:
        base = np.full(seg_edges.shape, 0.5)
    rgb = np.stack([base] * 3, -1)
    rgb[gt_edges] = (0.1, 0.9, 0.1)
    rgb[seg_edges] = (0.9, 0.1, 0.9)
    rgb[seg_edges & gt_edges] = (1, 1, 1)
    ax1.imshow(rgb, interpolation="nearest")
    ax1.set_title(f"z={z}: segmentation (magenta) vs ground truth (green)", fontsize=9)
    ax1.axis("off")
    if skeletons:
        _skeleton_panel(axes[2], metrics)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _skeleton_panel(ax, metrics: dict) -> None:
    """Where the ground-truth skeleton length went: correct, merged, split, omitted."""
    total = metrics["skeleton_length"] or 1.0
    parts = [("correct", "skeleton_correct_length", "tab:green"), ("merged", "skeleton_merged_length", "tab:red"),
             ("split", "skeleton_split_length", "tab:orange"), ("omitted (label 0)", "skeleton_omitted_length", "tab:gray")]
    left = 0.0
    for label, key, colour in parts:
        share = metrics[key] / total
        ax.barh([0], [share], height=0.6, left=left, color=colour, label=f"{label} {100 * share:.1f} %")
        left += share
    ax.set_xlim(0, 1)
    ax.set_ylim(-1.5, 1.5)
    ax.set_yticks([])
    ax.set_xlabel("fraction of ground-truth skeleton length")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    ax.set_title(f"ERL {metrics['erl'] / 1000:.3f} of {metrics['erl_max'] / 1000:.3f} um, "
                 f"{metrics['skeleton_merging_segments']} merging segments", fontsize=9)


def read_image(spec: str, like: LabelVolume) -> np.ndarray:
    """The image [z, y, x] over the box of `like` (a layer, or a `.npy`/`file.h5:dataset` stack
    whose first voxel is global voxel 0,0,0)."""
    from exaconnect.precomputed.sources import open_source

    (z, y, x), (x0, y0, z0) = like.labels.shape, like.offset
    box = Box((x0, y0, z0), (x0 + x, y0 + y, z0 + z))
    text = str(spec)
    if text.endswith(".npy") or ".h5:" in text:
        source = open_source(text)
        require_inside(box, Box.from_shape(tuple(source.shape[::-1])), f"the scored box in image {text}")
        return np.asarray(source.read_slab(z0, z0 + z))[:, y0:y0 + y, x0:x0 + x]
    vol = open_layer(text, layer_type="image")
    require_inside(box, layer_bounds(vol), f"the scored box in image layer {text}")
    return read_box(vol, box)


BASELINES = (("empty", "empty segmentation (one segment)"), ("watershed", "watershed of the image"))


def voxel_scores(metrics: dict) -> str:
    return (f"VI {metrics['vi']:.3f} (split {metrics['vi_split']:.3f}, merge {metrics['vi_merge']:.3f}), "
            f"adapted Rand error {metrics['adapted_rand_error']:.3f}")


def baseline_lines(metrics: dict) -> list[str]:
    """'baseline, WHAT: VI ...' for each baseline scored beside the segmentation."""
    found = metrics.get("baselines") or {}
    return [f"baseline, {what}: {voxel_scores(found[key])}" for key, what in BASELINES if found.get(key)]


def evaluate(segmentation_spec: str, groundtruth_spec: str, bbox: Box | None = None, out: str | None = None,
             ignore_segmentation_zero: bool = False, skeletons: SkeletonOptions | None = None,
             ignore_groundtruth_zero: bool = True, image_spec: str | None = None,
             watershed: WatershedParameters | None = None) -> dict:
    """Scores of a segmentation against ground truth in `bbox`; with `out`, the JSON and a PNG
    beside it. Every score is computed before anything is written.

    With `image_spec` (the segmented image), `baselines` holds the scores of an empty
    segmentation and of a seeded watershed of the image on the same box (precomputed/baselines.py),
    both with label 0 counted as one segment whatever `ignore_segmentation_zero` says."""
    segmentation = read_labels(segmentation_spec, bbox)
    groundtruth = read_labels(groundtruth_spec, bbox)
    metrics = segmentation_metrics(segmentation.labels, groundtruth.labels, ignore_groundtruth_zero=ignore_groundtruth_zero,
                                   ignore_segmentation_zero=ignore_segmentation_zero)
    metrics.update({"segmentation": segmentation_spec, "groundtruth": groundtruth_spec, "bbox": str(bbox) if bbox else None,
                    "ignore_segmentation_zero": bool(ignore_segmentation_zero),
                    "ignore_groundtruth_zero": bool(ignore_groundtruth_zero)})
    if skeletons is not None:
        metrics.update(skeleton_scores(segmentation, groundtruth, skeletons))
    image = read_image(image_spec, segmentation) if image_spec else None
    if image is not None:
        def score(labels: np.ndarray, truth: np.ndarray) -> dict:
            return segmentation_metrics(labels, truth, ignore_groundtruth_zero=ignore_groundtruth_zero)

        metrics["baselines"] = {"image": image_spec, **baseline_scores(image, groundtruth.labels, score,
                                                                       watershed or WatershedParameters())}
    if out:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(metrics, indent=1))
        write_figure(segmentation.labels, groundtruth.labels, metrics, out_path.with_suffix(".png"), image)
    return metrics
