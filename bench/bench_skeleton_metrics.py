"""Skeleton metrics of the reference's whole-cube segmentation of FIB-25 training_sample2
(issue 25's figures): kimimaro skeletons of the ground truth, expected run length with the
strict and the lenient merge rule, and VI / adapted Rand error with label 0 as one segment.

    .venv/bin/python bench/bench_skeleton_metrics.py [--scale 1.5 --const 300 --dust-threshold 100]

Prints one JSON line; lengths in um.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import FIB25, SHARED, emit, require_fib25, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--const", type=float, default=300.0)
    parser.add_argument("--dust-threshold", type=int, default=100)
    parser.add_argument("--merge-min-nodes", type=int, nargs="*", default=[2, 3, 5],
                        help="lenient rules to report beside the strict one")
    args = parser.parse_args()
    require_fib25()
    import h5py

    from exaconnect.precomputed.evaluate import segmentation_metrics
    from exaconnect.precomputed.skeleton_metrics import KimimaroParameters, skeleton_metrics, skeletonize_labels

    start = time.perf_counter()
    with h5py.File(FIB25 / "groundtruth.h5", "r") as f:
        groundtruth = f["stack"][:]
    reference = np.load(SHARED / "reference/fib25/training_sample2_ffn_segmentation.npz")["segmentation"]
    resolution = (10.0, 10.0, 10.0)
    parameters = KimimaroParameters(scale=args.scale, const=args.const, dust_threshold=args.dust_threshold,
                                    anisotropy=resolution)
    kimimaro_s, skeletons = timed(skeletonize_labels, groundtruth, parameters)
    metrics_s, strict = timed(skeleton_metrics, skeletons, reference, resolution)
    lenient = {k: skeleton_metrics(skeletons, reference, resolution, merge_min_nodes=k) for k in args.merge_min_nodes}
    truth = skeleton_metrics(skeletons, groundtruth, resolution)
    voxels = segmentation_metrics(reference, groundtruth)
    every_voxel = segmentation_metrics(reference, groundtruth, ignore_groundtruth_zero=False)
    um = 1e-3
    emit(
        "skeleton_metrics",
        kimimaro=parameters.to_dict(),
        skeletons=strict.skeleton_count,
        skeleton_length_um=round(strict.skeleton_length * um, 1),
        erl_um=round(strict.erl * um, 4),
        erl_max_um=round(strict.erl_max * um, 3),
        groundtruth_erl_um=round(truth.erl * um, 3),
        merging_segments=strict.merging_segments,
        merged_skeletons=strict.merged_skeletons,
        split_edges=strict.split_edges,
        edges=strict.edges,
        omitted_fraction=round(strict.omitted_fraction, 4),
        omitted_length_fraction=round(strict.omitted_length / strict.skeleton_length, 4),
        merged_length_fraction=round(strict.merged_length / strict.skeleton_length, 4),
        lenient={str(k): {"erl_um": round(m.erl * um, 4), "merging_segments": m.merging_segments}
                 for k, m in lenient.items()},
        vi=round(voxels["vi"], 4), vi_split=round(voxels["vi_split"], 4), vi_merge=round(voxels["vi_merge"], 4),
        adapted_rand_error=round(voxels["adapted_rand_error"], 4),
        vi_every_voxel=round(every_voxel["vi"], 4), adapted_rand_error_every_voxel=round(every_voxel["adapted_rand_error"], 4),
        kimimaro_s=round(kimimaro_s, 2),
        skeleton_metrics_s=round(metrics_s, 3),
        total_s=round(time.perf_counter() - start, 2),
    )


if __name__ == "__main__":
    main()
