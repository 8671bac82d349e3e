"""Acceptance of services/align on real EM: the whole FIB-25 cube (250 sections of 250x250,
already aligned) misaligned with recorded truth (random translation up to 40 px per axis,
rotation up to 1.5 degrees, smooth elastic distortion up to 5 px, one blank and one
contrast-inverted section), aligned through a real fq:// queue by a real worker. Also the
unperturbed cube (identity, no drift). Prints one JSON line.

End-point errors (px) are over the good sections:
  epe_*            stack-wide, after removing one global rigid transform (the issue's measure);
  pair_epe_*       between consecutive good sections (what neighbour matching determines);
  consistency_*    against the aligner's own result on the unperturbed cube (undoing the
                   perturbation, apart from what the aligner does to the original data).
Throughput is megapixels of sections per second of one worker process, for the flow stage and
for the render stage (the machine's other load included).

    .venv/bin/python bench/bench_align.py [--sections N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fib25" / "training_sample2"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", type=int, default=250)
    parser.add_argument("--out", default=None, help="keep layers and report here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    if not SHARED.exists():
        print(json.dumps({"skipped": f"FIB-25 not found at {SHARED}"}))
        return 0
    import imageio.v3 as iio

    from exaconnect.align.flow import FlowConfig, grid_points
    from exaconnect.align.match import AlignConfig, finalize_meshes, solve_in_memory
    from exaconnect.align.mesh import MeshConfig
    from exaconnect.align.perturb import PerturbConfig, misalign_stack
    from exaconnect.align.quality import chunked_correlation, end_point_error, neighbor_end_point_error
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box
    from exaconnect.services.align import _load_npz, align_report, align_stack_through_queue, get_file, load_meshes
    from exaconnect.services.ingest import IngestOptions, ingest_now

    files = sorted((SHARED / "grayscale_maps").glob("*.png"))[: args.sections]
    original = np.stack([iio.imread(f) for f in files]).astype(np.uint8)
    n = original.shape[0]
    blank, inverted = n // 4, (2 * n) // 3
    misaligned, truth = misalign_stack(original, PerturbConfig(blank_sections=(blank,), inverted_sections=(inverted,)), args.seed)
    config = AlignConfig(flow=FlowConfig(patch_size=64, stride=16), mesh=MeshConfig(stride=16, block_size=64, block_overlap=4))

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_align_"))
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "misaligned.npy", misaligned)
    src, dest = str(root / "src"), str(root / "dest")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(root / "queue", ignore_errors=True)
    ingest_now(str(root / "misaligned.npy"), src, IngestOptions("image", (10, 10, 10), chunk_size=(64, 64, 64), overwrite=True), progress=False)
    seconds = align_stack_through_queue(src, dest, str(root / "queue"), workers=1, config=config)
    report = align_report(src, dest)
    meshes, stride = load_meshes(dest)

    good = [z for z in range(n) if z not in truth.bad_sections]
    shape = original.shape[1:]
    absolute = end_point_error(meshes, stride, truth, good, shape)
    pair = neighbor_end_point_error(meshes, stride, truth, good, shape)

    # The same blocks with the tilt in z removed as well (MeshConfig.detrend="linear").
    blocks = []
    for start, _ in json.loads(get_file(dest, "align/blocks.json")):
        data = _load_npz(dest, f"align/blocks/{start:05d}.npz")
        blocks.append((start, {int(z): m for z, m in zip(data["z"], data["meshes"])}))
    statuses = {s["z"]: s["status"] for s in json.loads(get_file(dest, "align/sections.json"))}
    linear_config = MeshConfig(stride=16, block_size=64, block_overlap=4, detrend="linear")
    linear = end_point_error(finalize_meshes(blocks, shape, statuses, linear_config), stride, truth, good, shape)

    # Identity: the unperturbed cube through the same aligner.
    started = time.time()
    identity_blocks, identity_statuses, _ = solve_in_memory(original, config)
    identity_seconds = time.time() - started
    identity_meshes = finalize_meshes(identity_blocks, shape, identity_statuses, config.mesh)
    identity_linear = finalize_meshes(identity_blocks, shape, identity_statuses, linear_config)
    grid = grid_points(shape, stride)
    drift = np.stack([np.linalg.norm(identity_meshes[z] - grid, axis=-1) for z in range(n)])
    drift_linear = np.stack([np.linalg.norm(identity_linear[z] - grid, axis=-1) for z in range(n)])
    consistency = end_point_error(meshes, stride, truth, good, shape, reference_meshes=identity_meshes)

    vol = open_layer(dest)
    out = read_box(vol, layer_bounds(vol))
    pairs = list(zip(good[:-1], good[1:]))
    after = np.nanmean([chunked_correlation(out[a], out[b], 50, (out[a] > 0) & (out[b] > 0)) for a, b in pairs])
    before = np.nanmean([chunked_correlation(misaligned[a], misaligned[b], 50, (misaligned[a] > 0) & (misaligned[b] > 0)) for a, b in pairs])
    reference = np.nanmean([chunked_correlation(original[a], original[b], 50) for a, b in pairs])

    megapixels = n * shape[0] * shape[1] / 1e6
    result = {
        "bench": "align_fib25",
        "sections": n, "section_shape": list(shape), "bad_sections": {"blank": blank, "inverted": inverted},
        "problem_sections": report["problem_sections"],
        **{k: round(v, 3) for k, v in absolute.as_dict().items()},
        **{"pair_" + k: round(v, 3) for k, v in pair.as_dict().items()},
        **{"consistency_" + k: round(v, 3) for k, v in consistency.as_dict().items()},
        **{"linear_detrend_" + k: round(v, 3) for k, v in linear.as_dict().items()},
        "identity_rms_displacement_px": round(float(np.sqrt(np.mean(drift**2))), 3),
        "identity_max_displacement_px": round(float(drift.max()), 3),
        "linear_detrend_identity_rms_displacement_px": round(float(np.sqrt(np.mean(drift_linear**2))), 3),
        "linear_detrend_identity_max_displacement_px": round(float(drift_linear.max()), 3),
        "correlation_original": round(float(reference), 4),
        "correlation_before": round(float(before), 4),
        "correlation_after": round(float(after), 4),
        "correlation_ratio": round(float(after / reference), 4),
        "mean_valid_flow_fraction": round(report["mean_valid_flow_fraction"], 3),
        "flow_mpix_per_s": round(megapixels / seconds["flow"], 3),
        "render_mpix_per_s": round(megapixels / seconds["render"], 3),
        "identity_flow_mpix_per_s": round(megapixels / identity_seconds, 3),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "report_png": report.get("png"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
