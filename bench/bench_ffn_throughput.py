"""FFN inference throughput on FIB-25 crops; prints one JSON line.

Measures (1) the bare network: evaluations/s and GFLOP/s at batch 1 and batched, against
this CPU's fp32 peak; (2) end-to-end segmentation of independent crops one by one and with
the batched executor; (3) optionally reduced precision, with its effect on the crop64
segmentation against the reference (variation of information).

    .venv/bin/python bench/bench_ffn_throughput.py [--crops 2] [--batch 4] [--precisions float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PNGS = SHARED / "data" / "fib25" / "training_sample2" / "grayscale_maps"
CHECKPOINT = SHARED / "models" / "ffn-fib25" / "model.ckpt-27465036"
REFERENCE64 = SHARED / "reference" / "fib25" / "training_sample2_crop64_ffn_segmentation.npz"

# fp32 flop per cycle per core: two 256-bit FMA pipes x 8 lanes x 2 (AVX2, as briefed);
# cores with two full 512-bit FMA pipes (e.g. Zen 5, recent Xeons) reach twice that.
# /proc/cpuinfo gives the nominal clock; under boost a core runs faster, so a measured
# fraction above 1 means the nominal-clock peak understates the hardware, not an error.
FLOP_PER_CYCLE_AVX2 = 32
FLOP_PER_CYCLE_AVX512 = 64


def cpu_peak() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)]
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    cores = len(os.sched_getaffinity(0))
    ghz = (max(mhz) if mhz else 2500.0) / 1000.0
    return {
        "cpu": model.group(1).strip() if model else "unknown",
        "cores": cores,
        "clock_ghz": round(ghz, 3),
        "avx512f": "avx512f" in flags,
        "peak_gflops_avx2_fp32": round(cores * ghz * FLOP_PER_CYCLE_AVX2, 1),
        "peak_gflops_avx512_fp32": round(cores * ghz * FLOP_PER_CYCLE_AVX512, 1),
    }


def load_volume(size: int, crops: int) -> list[np.ndarray]:
    import imageio.v3 as iio

    files = sorted(PNGS.glob("*.png"))
    if not files:
        sys.exit(f"FIB-25 PNGs absent: {PNGS}")
    volume = np.stack([iio.imread(f) for f in files])
    # Independent subvolumes along the diagonal of the cube, the first one the reference crop.
    step = max(1, (min(volume.shape) - size) // max(crops - 1, 1))
    return [np.ascontiguousarray(volume[o : o + size, o : o + size, o : o + size]) for o in range(0, step * crops, step)][:crops]


def network_rate(predictor, batch: int, seconds: float) -> float:
    fov = predictor.model_config.fov_zyx
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, *fov)).astype(np.float32)
    masks = np.full((batch, *fov), -2.94, np.float32)
    predictor(images, masks)  # trace / warm up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor(images, masks)
        count += batch
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--crops", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window of the bare-network runs")
    parser.add_argument("--precisions", default="float32", help="comma list: float32,bfloat16,float16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--xla", action="store_true")
    args = parser.parse_args()

    from exaconnect.ffn.inference import segment_subvolume, segment_subvolumes
    from exaconnect.ffn.predictor import load_model, with_precision

    peak = cpu_peak()
    base = load_model(CHECKPOINT, device=args.device, jit_compile=args.xla)
    flops = base.model_config.flops_per_evaluation()
    crops = load_volume(args.crop_size, args.crops)
    out: dict = {"bench": "ffn_throughput", **peak, "device": base.device, "xla": args.xla,
                 "gflop_per_evaluation": round(flops / 1e9, 2), "crop_size": args.crop_size,
                 "crops": len(crops), "batch": args.batch}

    for precision in args.precisions.split(","):
        predictor = base if precision == "float32" else with_precision(base, precision)
        tag = precision
        for batch in sorted({1, args.batch}):
            rate = network_rate(predictor, batch, args.seconds)
            gflops = rate * flops / 1e9
            out[f"{tag}_net_b{batch}_evals_per_s"] = round(rate, 2)
            out[f"{tag}_net_b{batch}_gflops"] = round(gflops, 1)
            out[f"{tag}_net_b{batch}_fraction_of_avx2_peak"] = round(gflops / peak["peak_gflops_avx2_fp32"], 3)
            out[f"{tag}_net_b{batch}_fraction_of_avx512_peak"] = round(gflops / peak["peak_gflops_avx512_fp32"], 3)
        # End to end, one subvolume at a time, then all crops sharing batched calls.
        started = time.perf_counter()
        singles = [segment_subvolume(c, predictor) for c in crops]
        one_by_one_s = time.perf_counter() - started
        evaluations = sum(r.counters["network-evaluations"] for r in singles)
        voxels = sum(r.counters.get("voxels-segmented", 0) for r in singles)
        started = time.perf_counter()
        batched = segment_subvolumes(crops, predictor, batch_size=args.batch)
        batched_s = time.perf_counter() - started
        same = all(np.array_equal(a.labels, b.labels) for a, b in zip(singles, batched))
        out.update({
            f"{tag}_e2e_evaluations": evaluations,
            f"{tag}_e2e_b1_evals_per_s": round(evaluations / one_by_one_s, 2),
            f"{tag}_e2e_b1_voxels_per_s": round(voxels / one_by_one_s),
            f"{tag}_e2e_b1_gflops": round(evaluations * flops / one_by_one_s / 1e9, 1),
            f"{tag}_e2e_batched_evals_per_s": round(evaluations / batched_s, 2),
            f"{tag}_e2e_batched_voxels_per_s": round(voxels / batched_s),
            f"{tag}_e2e_batched_gflops": round(evaluations * flops / batched_s / 1e9, 1),
            f"{tag}_batched_equals_one_by_one": same,
            f"{tag}_network_time_fraction": round(
                sum(r.counters["time-network-s"] for r in singles) / one_by_one_s, 3),
        })
        if REFERENCE64.exists() and args.crop_size == 64:
            from exaconnect.precomputed.evaluate import segmentation_metrics

            ref = np.load(REFERENCE64)["segmentation"].astype(np.int64)
            m = segmentation_metrics(singles[0].labels.astype(np.int64), ref,
                                     ignore_groundtruth_zero=False, ignore_segmentation_zero=False)
            out[f"{tag}_crop64_vi_vs_reference"] = round(m["vi"], 5)
            out[f"{tag}_crop64_evaluations"] = singles[0].counters["network-evaluations"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
