"""The whole FIB-25 training_sample2 cube (250^3) with the published checkpoint, scored against
ground truth on the voxels the reference labelled, next to the reference's own result.

About 26,000 network evaluations: hours on a 2-core CPU, minutes on a GPU.

    .venv/bin/python bench/bench_ffn_whole_cube.py [--out artifacts/ffn_whole_cube] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import FIB25, SHARED, emit, require_fib25  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="artifacts/ffn_whole_cube")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    require_fib25()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import h5py
    import imageio.v3 as iio

    from exaconnect.ffn.inference import segment_subvolume
    from exaconnect.ffn.predictor import load_model
    from exaconnect.precomputed.evaluate import contingency_table, segmentation_metrics, variation_of_information

    image = np.stack([iio.imread(f) for f in sorted((FIB25 / "grayscale_maps").glob("*.png"))])
    with h5py.File(FIB25 / "groundtruth.h5", "r") as f:
        groundtruth = f["stack"][:]
    reference = np.load(SHARED / "reference/fib25/training_sample2_ffn_segmentation.npz")["segmentation"]
    predictor = load_model(SHARED / "models/ffn-fib25/model.ckpt-27465036", device=args.device)
    started = time.perf_counter()
    result = segment_subvolume(image, predictor, progress=True)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "segmentation.npz", segmentation=result.labels)
    ours = segmentation_metrics(result.labels, groundtruth, ignore_segmentation_zero=True)
    theirs = segmentation_metrics(reference, groundtruth, ignore_segmentation_zero=True)
    split, merge = variation_of_information(contingency_table(result.labels, reference, ignore_groundtruth_zero=False))
    figures = {
        "device": predictor.device,
        "seconds": round(seconds, 1),
        "network_evaluations": result.counters.get("network-evaluations"),
        "reference_network_evaluations": 25799,
        "objects": len(result.objects),
        "vi_vs_groundtruth": round(ours["vi"], 4), "vi_split": round(ours["vi_split"], 4), "vi_merge": round(ours["vi_merge"], 4),
        "adapted_rand_error": round(ours["adapted_rand_error"], 4),
        "reference_vi_vs_groundtruth": round(theirs["vi"], 4),
        "vi_ours_vs_reference": round(split + merge, 4),
        "evaluations_per_s": round(result.counters.get("network-evaluations", 0) / seconds, 2),
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    emit("ffn_whole_cube_fib25", **figures)


if __name__ == "__main__":
    main()
