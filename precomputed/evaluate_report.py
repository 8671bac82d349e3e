"""Evaluate a segmentation layer against a ground-truth layer: JSON scores and a PNG figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exaconnect.precomputed.bbox import Box, require_inside
from exaconnect.precomputed.evaluate import contingency_table, segmentation_metrics
from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box


def load_labels(spec: str, bbox: Box | None) -> np.ndarray:
    """Labels [z, y, x] from a layer, or from a `.npy`/`.npz` file (array `segmentation`) or `file.h5:dataset`."""
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
        return read_box(vol, box)
    if bbox is not None:
        require_inside(bbox, Box.from_shape(array.shape[::-1]), f"--bbox for {text}")
        (x0, y0, z0), (x1, y1, z1) = bbox.start, bbox.stop
        array = array[z0:z1, y0:y1, x0:x1]
    return array


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

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.5))
    sc = ax0.scatter(split, merge, s=8 + 60 * sizes / sizes.max(), c=np.log10(sizes), cmap="viridis")
    ax0.set_xlabel("split entropy of body (bits)")
    ax0.set_ylabel("merge entropy per voxel (bits)")
    ax0.set_title(f"VI split {metrics['vi_split']:.3f}  merge {metrics['vi_merge']:.3f}  ARE {metrics['adapted_rand_error']:.3f}", fontsize=9)
    fig.colorbar(sc, ax=ax0, label="log10 body size")
    z = segmentation.shape[0] // 2
    from exaconnect.precomputed.synthetic import membrane_mask

    seg_edges = membrane_mask(segmentation[z : z + 1])[0]
    gt_edges = membrane_mask(groundtruth[z : z + 1])[0]
    base = image[z].astype(float) / 255 if image is not None else np.full(seg_edges.shape, 0.5)
    rgb = np.stack([base] * 3, -1)
    rgb[gt_edges] = (0.1, 0.9, 0.1)
    rgb[seg_edges] = (0.9, 0.1, 0.9)
    rgb[seg_edges & gt_edges] = (1, 1, 1)
    ax1.imshow(rgb, interpolation="nearest")
    ax1.set_title(f"z={z}: segmentation (magenta) vs ground truth (green)", fontsize=9)
    ax1.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(segmentation_spec: str, groundtruth_spec: str, bbox: Box | None = None, out: str | None = None,
             ignore_segmentation_zero: bool = False) -> dict:
    segmentation = load_labels(segmentation_spec, bbox)
    groundtruth = load_labels(groundtruth_spec, bbox)
    metrics = segmentation_metrics(segmentation, groundtruth, ignore_segmentation_zero=ignore_segmentation_zero)
    metrics.update({"segmentation": segmentation_spec, "groundtruth": groundtruth_spec, "bbox": str(bbox) if bbox else None})
    if out:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(metrics, indent=1))
        write_figure(segmentation, groundtruth, metrics, out_path.with_suffix(".png"))
    return metrics
