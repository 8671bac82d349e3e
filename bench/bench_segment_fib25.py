"""Acceptance benchmark: the 128^3 FIB-25 crop segmented as 8 overlapping subvolumes through
the queue with 2 workers, stitched, and scored against ground truth next to the reference's
single-canvas segmentation of the same crop. Prints one JSON line.

    nice .venv/bin/python bench/bench_segment_fib25.py [--crop 128] [--subvolume 64] [--overlap 16]

About 20-40 minutes on a 2-core CPU (the FIB-25 network is ~0.5 s per evaluation there).
Overlap 16 is the least that works with this network: the FFN never centres its 33^3 field of
view closer than 16 voxels to a canvas edge, so with less overlap the band between two write
boxes would get no seeds from either side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIB25 = SHARED / "data" / "fib25" / "training_sample2"
CHECKPOINT = SHARED / "models" / "ffn-fib25" / "model.ckpt-27465036"
REFERENCE = SHARED / "reference" / "fib25" / "training_sample2_crop{n}_ffn_segmentation.npz"


def load_crop(n: int) -> tuple[np.ndarray, np.ndarray]:
    import h5py
    import imageio.v3 as iio

    files = sorted((FIB25 / "grayscale_maps").glob("*.png"))[:n]
    image = np.stack([iio.imread(f)[:n, :n] for f in files]).astype(np.uint8)
    with h5py.File(FIB25 / "groundtruth.h5", "r") as f:
        groundtruth = np.asarray(f["stack"][:n, :n, :n])
    return image, groundtruth


def stage_split(run, pass_name: str) -> dict:
    """Per-task read/inference/encode seconds summed from the staging markers."""
    from exaconnect.services.segment_staging import labels_path, marker

    totals = {"read_s": 0.0, "infer_s": 0.0, "encode_s": 0.0, "network_s": 0.0, "evaluations": 0, "objects": 0}
    for cell in run.grid.cells():
        done = marker(run.staging, labels_path(pass_name, cell.index))
        for key in ("read_s", "infer_s", "encode_s"):
            totals[key] += done["timing"][key]
        totals["network_s"] += done["counters"].get("time-network-s", 0.0)
        totals["evaluations"] += int(done["counters"].get("network-evaluations", 0))
        totals["objects"] += int(done["objects"])
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in totals.items()}


def forget_stitching(staging: str) -> None:
    """Make the runner redo faces, equivalence and relabel on finished FFN results (after a
    change of the matching rules, say): their files and their stage records go."""
    from exaconnect.precomputed.store import ArtifactStore
    from exaconnect.services.runner import forget_stages

    for folder in ("faces", "equivalence"):
        ArtifactStore(staging).delete_prefix(folder)
    forget_stages(f"{staging}/run", ["segment.faces", "segment.equivalence", "segment.relabel", "pyramid.segmentation"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--subvolume", type=int, default=64)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep layers and staging here (default: a temp dir)")
    parser.add_argument("--restitch", action="store_true",
                        help="keep the FFN results in --workdir, redo only the stitch stages (e.g. after changing matching)")
    args = parser.parse_args()
    if args.restitch and not args.workdir:
        parser.error("--restitch needs --workdir of an earlier run")
    if not Path(str(CHECKPOINT) + ".index").exists():
        print(json.dumps({"skipped": f"FFN checkpoint not found at {CHECKPOINT}"}))
        return 0

    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.evaluate import segmentation_metrics
    from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, open_layer, read_box, write_box
    from exaconnect.precomputed.stitching import objects_split_at_planes
    from exaconnect.services.segment_stages import SegmentPlan, segment_volume
    from exaconnect.services.segment_staging import PassSpec

    n, sub, ov = args.crop, args.subvolume, args.overlap
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_segment_"))
    work.mkdir(parents=True, exist_ok=True)
    image, groundtruth = load_crop(n)
    box = Box((0, 0, 0), (n, n, n))
    vol = create_layer(str(work / "image"), LayerSpec("image", "uint8", (n, n, n), (10.0, 10.0, 10.0),
                                                       chunk_size=(32, 32, 32)), Provenance("bench"), overwrite=True)
    write_box(vol, box, image)

    started = time.perf_counter()
    if args.restitch:
        forget_stitching(str(work / "segmentation.staging"))
    plan = SegmentPlan(str(work / "image"), str(work / "segmentation"), (PassSpec("initial", str(CHECKPOINT)),),
                       subvolume=(sub, sub, sub), overlap=(ov, ov, ov), downsample_mips=1)
    run, report = segment_volume(plan, str(work / "queue"), workers=args.workers)
    total = time.perf_counter() - started
    stitched = read_box(open_layer(run.segmentation_layer), box)
    np.savez_compressed(work / "stitched.npz", segmentation=stitched)

    planes = {axis: list(range(sub, n, sub)) for axis in range(3)}
    result = {
        "benchmark": "segment_fib25_stitched",
        "crop": n, "subvolume": sub, "overlap": ov, "workers": args.workers, "subvolumes": len(run.grid.cells()),
        "stitched": segmentation_metrics(stitched, groundtruth, ignore_segmentation_zero=True),
        "stitched_unlabelled_fraction": round(float((stitched == 0).mean()), 4),
        "stitched_face_splits": objects_split_at_planes(stitched, groundtruth, planes),
        "seconds": {k: round(v, 1) for k, v in report.seconds.items()},
        "total_s": round(total, 1),
        "voxels_per_s": round(n**3 / total, 1),
        "task_time_split": stage_split(run, "initial"),
        "workdir": str(work),
    }
    reference_path = Path(str(REFERENCE).format(n=n))
    if reference_path.exists():
        reference = np.load(reference_path)["segmentation"]
        result["single_canvas"] = segmentation_metrics(reference, groundtruth, ignore_segmentation_zero=True)
        result["single_canvas_unlabelled_fraction"] = round(float((reference == 0).mean()), 4)
        result["single_canvas_face_splits"] = objects_split_at_planes(reference, groundtruth, planes)
        result["vi_difference"] = round(result["stitched"]["vi"] - result["single_canvas"]["vi"], 4)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
