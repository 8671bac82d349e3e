"""FFN inference at float32, bfloat16 and float16 with the published FIB-25 checkpoint, side by
side in one run: each precision segments the same crop of training_sample2 (the crop is the
canvas, as `exaconnect segment box` does), scored against the ground truth with label 0 one
segment and no voxel left out (VI, adapted Rand error), expected run length on kimimaro
skeletons of the crop's ground truth, voxel agreement with the float32 result, and network
evaluations per second. Prints one JSON line.

    nice -n 5 .venv/bin/python bench/bench_ffn_precision.py [--bbox 64,64,64,160,160,160]

The bare-network rate is timed in interleaved rounds (float32, bfloat16, float16, float32,
...) so that a change of load on a shared machine falls on every precision alike; its
per-round ratios to float32 are the speed-ups to quote. Each precision's oneDNN convolution
kernels are read from ONEDNN_VERBOSE in a child process (one network call), to show which
instruction set TensorFlow actually used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import FIB25, SHARED, emit, require_fib25  # noqa: E402

CHECKPOINT = SHARED / "models" / "ffn-fib25" / "model.ckpt-27465036"
PRECISIONS = ("float32", "bfloat16", "float16")
RESOLUTION = (10.0, 10.0, 10.0)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def cpu_description() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    present = set(flags.group(1).split()) if flags else set()
    return {"cpu": model.group(1).strip() if model else "unknown", "cores": len(os.sched_getaffinity(0)),
            "cpu_flags": {f: f in present for f in CPU_FLAGS}}


def load_crop(box) -> tuple[np.ndarray, np.ndarray]:
    """Image and ground truth of `box` (x y z), as [z, y, x] arrays."""
    import h5py
    import imageio.v3 as iio

    (x0, y0, z0), (x1, y1, z1) = box.start, box.stop
    files = sorted((FIB25 / "grayscale_maps").glob("*.png"))
    if z1 > len(files):
        sys.exit(f"--bbox {box}: z stop {z1} beyond the {len(files)} sections of {FIB25}")
    image = np.stack([iio.imread(f)[y0:y1, x0:x1] for f in files[z0:z1]]).astype(np.uint8)
    with h5py.File(FIB25 / "groundtruth.h5", "r") as f:
        groundtruth = np.asarray(f["stack"][z0:z1, y0:y1, x0:x1])
    if image.shape != groundtruth.shape or image.shape != tuple(b - a for a, b in zip(box.start, box.stop))[::-1]:
        sys.exit(f"--bbox {box}: outside the {FIB25} volume (image {image.shape}, ground truth {groundtruth.shape})")
    return image, groundtruth


def oneDNN_kernels(precision: str) -> dict:
    """Convolution implementations oneDNN ran for one network call at `precision` (child process)."""
    env = dict(os.environ, ONEDNN_VERBOSE="1", TF_CPP_MIN_LOG_LEVEL="2")
    code = (
        "import sys, numpy as np\n"
        "from exaconnect.ffn.predictor import load_model\n"
        f"p = load_model({str(CHECKPOINT)!r}, config_overrides={{'precision': {precision!r}}}, device='cpu')\n"
        "fov = p.model_config.fov_zyx\n"
        "p(np.zeros((1, *fov), np.float32), np.full((1, *fov), -2.94, np.float32))\n"
        "print('=== measured call', flush=True)\n"
        "p(np.zeros((1, *fov), np.float32), np.full((1, *fov), -2.94, np.float32))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout.split("=== measured call", 1)[-1]
    kernels: dict[str, int] = {}
    conv_ms = 0.0
    isa = re.search(r"onednn_verbose,.*info,cpu,isa:(.+)", done.stdout)
    for line in out.splitlines():
        fields = line.split(",")
        if len(fields) > 6 and fields[3] == "exec" and fields[5] == "convolution":
            kernels[f"{fields[6]} {fields[8].split()[0]}"] = kernels.get(f"{fields[6]} {fields[8].split()[0]}", 0) + 1
            conv_ms += float(fields[-1])
    if done.returncode != 0 or not kernels:
        return {"error": (done.stderr or done.stdout)[-500:]}
    return {"convolutions": kernels, "convolution_ms_per_call": round(conv_ms, 2),
            "onednn_isa": isa.group(1).strip() if isa else None}


def network_rates(predictors: dict, image: np.ndarray, rounds: int, seconds: float) -> dict:
    """Bare-network evaluations per second, the precisions interleaved round by round, on a real
    patch (the crop's centre FOV with a seeded mask, as the first step of an object)."""
    first = next(iter(predictors.values()))
    fov = np.array(first.model_config.fov_zyx)
    start = (np.array(image.shape) - fov) // 2
    sel = tuple(slice(int(s), int(s + f)) for s, f in zip(start, fov))
    options = first.config.inference
    patch = ((image[sel].astype(np.float32) - options.image_mean) / options.image_stddev)[None]
    mask = np.full(patch.shape, -2.944, np.float32)  # logit(0.05), the reference's pad value
    mask[(0, *(fov // 2))] = 2.944
    for predictor in predictors.values():
        predictor(patch, mask)  # trace and warm
    rates: dict[str, list[float]] = {p: [] for p in predictors}
    for _ in range(rounds):
        for precision, predictor in predictors.items():
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                predictor(patch, mask)
                count += 1
            rates[precision].append(count / (time.perf_counter() - started))
    summary = {}
    for precision, values in rates.items():
        ratios = [v / f for v, f in zip(values, rates["float32"])] if "float32" in rates else []
        summary[precision] = {"evals_per_s_median": round(statistics.median(values), 3),
                              "evals_per_s_rounds": [round(v, 3) for v in values],
                              "speedup_vs_float32_median": round(statistics.median(ratios), 3) if ratios else None}
    return summary


def scores(labels: np.ndarray, groundtruth: np.ndarray, skeletons: dict, offset) -> dict:
    from exaconnect.precomputed.evaluate import segmentation_metrics
    from exaconnect.precomputed.skeleton_metrics import skeleton_metrics

    voxels = segmentation_metrics(labels, groundtruth, ignore_groundtruth_zero=False, ignore_segmentation_zero=False)
    skel = skeleton_metrics(skeletons, labels, RESOLUTION, offset=offset)
    return {
        "vi": round(voxels["vi"], 4), "vi_split": round(voxels["vi_split"], 4), "vi_merge": round(voxels["vi_merge"], 4),
        "adapted_rand_error": round(voxels["adapted_rand_error"], 4),
        "erl_nm": round(skel.erl, 1), "merging_segments": skel.merging_segments,
        "omitted_edge_fraction": round(skel.omitted_fraction, 4),
        "unsegmented_fraction": round(float(np.mean(labels == 0)), 4),
    }


def agreement(labels: np.ndarray, reference: np.ndarray) -> dict:
    """How far a segmentation is from float32's: identical labels (IDs follow seed order, so equal
    objects get equal IDs), and VI between the two, which ignores any renumbering."""
    from exaconnect.precomputed.evaluate import segmentation_metrics

    between = segmentation_metrics(labels, reference, ignore_groundtruth_zero=False, ignore_segmentation_zero=False)
    return {"same_label_fraction": round(float(np.mean(labels == reference)), 5),
            "same_segmented_fraction": round(float(np.mean((labels > 0) == (reference > 0))), 5),
            "vi_vs_float32": round(between["vi"], 4)}


def write_png(path: Path, image: np.ndarray, groundtruth: np.ndarray, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = image.shape[0] // 2
    panels = [("image", image[z], "gray"), ("ground truth", groundtruth[z], "tab20")]
    panels += [(p, r["labels"][z], "tab20") for p, r in results.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    rng = np.random.default_rng(0)
    for ax, (title, data, cmap) in zip(axes, panels):
        if cmap == "gray":
            ax.imshow(data, cmap="gray")
        else:
            # Shuffled colours so that neighbouring IDs look different; label 0 black.
            ids, inverse = np.unique(data, return_inverse=True)
            colours = rng.random((len(ids), 3))
            colours[ids == 0] = 0
            ax.imshow(colours[inverse.reshape(data.shape)])
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"FFN at three precisions, section z={z} of the crop", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bbox", default="64,64,64,160,160,160", help="crop of training_sample2, x0,y0,z0,x1,y1,z1")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the bare-network timing")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one precision's timing in a round")
    parser.add_argument("--no-isa-probe", action="store_true", help="skip the ONEDNN_VERBOSE child processes")
    parser.add_argument("--png", default=None, help="write the middle section of every result here")
    parser.add_argument("--save", default=None, help="write the segmentations to this .npz")
    args = parser.parse_args()
    require_fib25()
    if not Path(str(CHECKPOINT) + ".index").is_file():
        print(json.dumps({"skipped": f"FFN checkpoint not found at {CHECKPOINT}"}))
        return

    import tensorflow as tf
    from tqdm import tqdm

    from exaconnect.ffn.config import PRECISIONS as KNOWN
    from exaconnect.ffn.inference import segment_subvolume
    from exaconnect.ffn.predictor import load_model
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.skeleton_metrics import KimimaroParameters, skeletonize_labels

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in KNOWN]
    if unknown:
        parser.error(f"--precisions: unknown {unknown}; expected some of {KNOWN}")
    if "float32" not in precisions:
        precisions.insert(0, "float32")  # the yardstick of every ratio and agreement
    box = Box.parse(args.bbox)
    started = time.perf_counter()
    load_before = os.getloadavg()
    image, groundtruth = load_crop(box)
    kimimaro = KimimaroParameters(anisotropy=RESOLUTION)
    skeletons = skeletonize_labels(groundtruth, kimimaro, offset=box.start)

    predictors = {p: load_model(CHECKPOINT, config_overrides={"precision": p}, device="cpu") for p in precisions}
    results: dict[str, dict] = {}
    for precision in tqdm(precisions, desc="segment", file=sys.stderr):
        predictor = predictors[precision]
        fov = predictor.model_config.fov_zyx
        predictor(np.zeros((1, *fov), np.float32), np.zeros((1, *fov), np.float32))  # trace outside the timing
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = segment_subvolume(image, predictor)
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        counters = result.counters
        evaluations = int(counters["network-evaluations"])
        results[precision] = {
            "labels": result.labels,
            "objects": len(result.objects),
            "network_evaluations": evaluations,
            "segment_wall_s": round(wall_s, 1),
            "segment_cpu_s": round(cpu_s, 1),
            "network_s": round(counters["time-network-s"], 1),
            "evals_per_network_s": round(evaluations / counters["time-network-s"], 3),
            "evals_per_wall_s": round(evaluations / wall_s, 3),
            # CPU time of this process: less sensitive than wall time to others sharing the cores.
            "evals_per_cpu_s": round(evaluations / cpu_s, 3),
            **scores(result.labels, groundtruth, skeletons, box.start),
        }
        # A long run on a busy machine shows what it has so far.
        partial = {k: v for k, v in results[precision].items() if k != "labels"}
        tqdm.write(f"{precision}: {json.dumps(partial)}", file=sys.stderr)
    for precision, record in results.items():
        record.update(agreement(record["labels"], results["float32"]["labels"]))

    rates = network_rates(predictors, image, args.rounds, args.seconds)
    kernels = {} if args.no_isa_probe else {p: oneDNN_kernels(p) for p in precisions}
    if args.save:
        np.savez_compressed(args.save, **{p: r["labels"] for p, r in results.items()})
    if args.png:
        write_png(Path(args.png), image, groundtruth, results)
    table = {p: {k: v for k, v in r.items() if k != "labels"} for p, r in results.items()}
    for precision, record in table.items():
        record["network"] = rates[precision]
        if kernels:
            record["onednn"] = kernels[precision]
    emit(
        "ffn_precision",
        bbox=str(box), shape_zyx=list(image.shape), checkpoint=CHECKPOINT.name,
        tensorflow=tf.__version__, **cpu_description(),
        kimimaro=kimimaro.to_dict(), skeletons=len(skeletons),
        results=table,
        loadavg_before=[round(v, 2) for v in load_before], loadavg_after=[round(v, 2) for v in os.getloadavg()],
        total_s=round(time.perf_counter() - started, 1),
    )


if __name__ == "__main__":
    main()
