"""Acceptance of the alignment on real EM: the whole FIB-25 cube (250 sections of 250x250,
already aligned) misaligned with recorded truth (align/misalign.py: random translation up to 40 px
per axis, rotation up to 1.5 degrees, smooth elastic distortion up to 5 px, one blank and one
contrast-inverted section), aligned through a real fq:// queue by a real worker; the unperturbed
cube aligned too (drift, invariance); the baseline flow and render code (`git show 987a6fa:align/...`,
loaded into temporary modules) timed side by side with ours on the same pairs in this process;
a synthetic large section matched in tiles. Prints one JSON line.

Figures (px unless named otherwise):
  neighbour_*        recovered minus true displacement between consecutive good sections, on a
                     5 px grid of output pixels (median / rms / p95); the issue's accuracy measure.
  invariance_*       the same neighbour displacements, align(perturbed) against align(original).
  drift_*            how far aligning the unperturbed cube moves its sections (mesh node
                     displacement against the input), drift prior on (default: window chosen
                     per stack) and off, and with a fixed 16-section window.
  stack_epe_*        stack-wide error after one global rigid transform (informational: it
                     includes what no image-based aligner can tell from oblique neurites).
  correlation_*      mean chunked Pearson correlation of consecutive good sections.
  flow_mpix_per_cpu_s, render_mpix_per_cpu_s: ours and the baseline (987a6fa), same pairs, same process,
                     alternating, per CPU-second of this (single-threaded) process.
  big_section_*      a 2048 x 2048 synthetic pair matched whole and in 512 px tiles.

    nice -n 5 .venv/bin/python bench/bench_align.py [--sections N] [--out DIR] [--timing-pairs K] [--timing-only RUNS]
"""

from __future__ import annotations

import os

# One core per process, as queue workers run: multi-threaded BLAS spinning on a shared machine
# costs more CPU time than it saves.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "fib25" / "training_sample2"


# The alignment code as it was when the second alignment round was filed (after the layout
# change, before the round's own commit 8a3a35b): the fixed baseline of the side-by-side timings.
# (Loading HEAD's version instead would time our code against itself once the round landed.)
BASELINE_COMMIT = "987a6fa"


def head_module(path: str, name: str, commit: str = BASELINE_COMMIT):
    """The baseline commit's version of a module of ours, loaded under another name."""
    try:
        source = subprocess.check_output(["git", "show", f"{commit}:{path}"], cwd=REPO,
                                         stderr=subprocess.PIPE).decode()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench_align: cannot read {path} at baseline commit {commit} "
                         f"(a shallow clone? fetch the history): {exc.stderr.decode().strip()}")
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


def stats(err: np.ndarray) -> dict:
    err = np.asarray(err, float).ravel()
    return {"median": round(float(np.median(err)), 3), "rms": round(float(np.sqrt(np.mean(err**2))), 3),
            "p95": round(float(np.percentile(err, 95)), 3)}


def time_flow(stack: np.ndarray, pairs: int, config) -> dict:
    """Today's flow stage kernel and ours on the same consecutive pairs, alternating per pair:
    masks/preparation, whole-section translation and flow, CPU seconds of this process."""
    from exaconnect.align.coarse import estimate_translation
    from exaconnect.align.flow import estimate_flow, prepare_section

    old = head_module("align/flow.py", "old_flow")
    old_config = old.FlowConfig(patch_size=config.flow.patch_size, stride=config.flow.stride)
    n = min(pairs + 1, stack.shape[0])
    old_cpu = new_cpu = 0.0
    old_masks, prepared = {}, {}
    for z in range(1, n):
        t = time.process_time()
        for k in (z - 1, z):
            if k not in old_masks:
                old_masks[k] = old.section_mask(stack[k])
        a, b = stack[z - 1].astype(np.float32), stack[z].astype(np.float32)
        shift = estimate_translation(a, b, config.coarse, old_masks[z - 1], old_masks[z]).shift
        old.estimate_flow(a, b, shift, old_config, old_masks[z - 1], old_masks[z])
        old_cpu += time.process_time() - t
        t = time.process_time()
        for k in (z - 1, z):
            if k not in prepared:
                prepared[k] = prepare_section(stack[k], config.flow)
        shift = estimate_translation(prepared[z - 1].image, prepared[z].image, config.coarse,
                                     prepared[z - 1].mask, prepared[z].mask).shift
        estimate_flow(prepared[z - 1], prepared[z], shift, config.flow)
        new_cpu += time.process_time() - t
    mpix = (n - 1) * stack.shape[1] * stack.shape[2] / 1e6
    return {"pairs": n - 1, "ours": round(mpix / new_cpu, 3), "today": round(mpix / old_cpu, 3),
            "speedup": round(old_cpu / new_cpu, 2)}


def time_render(stack: np.ndarray, meshes: dict, stride: int, sections: int) -> dict:
    """Today's render kernel and ours, whole sections through their meshes, alternating."""
    from exaconnect.align import warp

    old = head_module("align/warp.py", "old_warp")
    old_cpu = new_cpu = 0.0
    worst = 0.0
    for z in range(min(sections, stack.shape[0])):
        t = time.process_time()
        a, _ = old.render_section(stack[z], meshes[z], stride)
        old_cpu += time.process_time() - t
        t = time.process_time()
        b, _ = warp.render_section(stack[z], meshes[z], stride)
        new_cpu += time.process_time() - t
        worst = max(worst, float(np.abs(a - b).max()))
    mpix = min(sections, stack.shape[0]) * stack.shape[1] * stack.shape[2] / 1e6
    return {"ours": round(mpix / new_cpu, 3), "today": round(mpix / old_cpu, 3), "speedup": round(old_cpu / new_cpu, 2),
            "max_abs_difference": round(worst, 4)}


def drift(meshes: dict, grid: np.ndarray, zs: list[int]) -> dict:
    d = np.stack([np.linalg.norm(meshes[z] - grid, axis=-1) for z in zs])
    return {"median": round(float(np.median(d)), 3), "p95": round(float(np.percentile(d, 95)), 3),
            "max": round(float(d.max()), 3)}


def invariance(meshes: dict, reference: dict, stride: int, truth, sections: list[int], shape, step: int = 5,
               margin: int = 10) -> dict:
    """Neighbour displacements of align(perturbed) against those of align(original). For output
    pixel q of the perturbed run, sections a and b show original positions o_a, o_b; the original
    run's output pixel q' showing o_a in section a shows M'_b(q') in section b. The difference of
    the two neighbour displacements is |o_b - M'_b(q')|."""
    from exaconnect.align.warp import region_map

    h, w = shape
    ys, xs = np.arange(margin, h - margin, step), np.arange(margin, w - margin, step)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    full = (0, h, 0, w)
    limit = np.array([h - 1, w - 1])
    errors = []
    maps = {z: region_map(meshes[z], stride, full)[yy, xx].reshape(-1, 2) for z in sections}
    ref_maps = {z: region_map(reference[z], stride, full) for z in sections}
    for a, b in zip(sections[:-1], sections[1:]):
        oa, ob = truth.source_positions(a, maps[a]), truth.source_positions(b, maps[b])
        # q' with M'_a(q') = o_a: M' is near the identity, so two fixed-point steps suffice.
        q = oa.copy()
        for _ in range(2):
            q = q - (_sample(ref_maps[a], q) - oa)
        mb = _sample(ref_maps[b], q)
        inside = ((maps[a] >= 0) & (maps[a] <= limit)).all(1) & ((maps[b] >= 0) & (maps[b] <= limit)).all(1)
        inside &= ((oa >= 0) & (oa <= limit)).all(1) & ((ob >= 0) & (ob <= limit)).all(1)
        inside &= ((q >= 0) & (q <= limit)).all(1)
        errors.append(np.linalg.norm(ob - mb, axis=1)[inside])
    return stats(np.concatenate(errors))


def _sample(dense: np.ndarray, points: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.stack([ndimage.map_coordinates(dense[..., c], [points[:, 0], points[:, 1]], order=1, mode="nearest")
                     for c in range(2)], axis=1)


def big_section(size: int = 2048, tile: int = 512) -> dict:
    """A synthetic EM-like pair of `size` px, the moving one rotated, shifted and elastically
    warped: flow whole and in tiles (`estimate_flow_tiled`, as the flow task does for sections
    wider than flow.tile_size), error against the truth, peak memory of each; rendering by
    64 px boxes against rendering whole."""
    import tracemalloc

    from scipy import ndimage

    from exaconnect.align.flow import FlowConfig, estimate_flow, estimate_flow_tiled, grid_points
    from exaconnect.align.warp import region_map, render_section, source_window, warp_region

    rng = np.random.default_rng(5)
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), 2.0)
    ref = np.clip(128 + 35 * texture / texture.std(), 1, 255).astype(np.float32)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    angle, shift = np.radians(0.6), np.array([13.3, -21.7])
    c = (size - 1) / 2
    elastic = 4.0 * np.sin(2 * np.pi * yy / size) * np.cos(2 * np.pi * xx / size)
    # mov(T(p)) = ref(p) with T(p) = R(p - c) + c + shift + e(p): sample ref at T^-1 (approximately).
    dy, dx = yy - c - shift[0] - elastic, xx - c - shift[1]
    src_y = np.cos(angle) * dy + np.sin(angle) * dx + c
    src_x = -np.sin(angle) * dy + np.cos(angle) * dx + c
    mov = ndimage.map_coordinates(ref, [src_y, src_x], order=3, mode="constant", cval=0.0).astype(np.float32)
    del dy, dx, src_y, src_x, yy, xx
    config = FlowConfig(patch_size=64, stride=32, tile_size=tile)
    tracemalloc.start()
    t = time.process_time()
    whole = estimate_flow(ref, mov, tuple(shift), config)
    whole_s = time.process_time() - t
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()

    def reader(image):
        def read(y0, y1, x0, x1):
            out = np.zeros((y1 - y0, x1 - x0), np.float32)
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, size), max(x0, 0), min(x1, size)
            if cy0 < cy1 and cx0 < cx1:
                out[cy0 - y0: cy1 - y0, cx0 - x0: cx1 - x0] = image[cy0:cy1, cx0:cx1]
            return out
        return read

    t = time.process_time()
    tiled = estimate_flow_tiled(reader(ref), reader(mov), (size, size), tuple(shift), config)
    tiled_s = time.process_time() - t
    tiled_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    points = grid_points((size, size), config.stride)
    p = points - c
    rigid = np.stack([np.cos(angle) * p[..., 0] - np.sin(angle) * p[..., 1],
                      np.sin(angle) * p[..., 0] + np.cos(angle) * p[..., 1]], -1) + c + shift
    # T(p) = rigid(p) + (e(T(p)), 0): a fixed point, reached in a few steps (|grad e| ~ 0.01).
    target = rigid.copy()
    for _ in range(4):
        target[..., 0] = rigid[..., 0] + 4.0 * np.sin(2 * np.pi * target[..., 0] / size) * np.cos(2 * np.pi * target[..., 1] / size)
    truth = target - points
    both = whole.valid & tiled.valid
    inner = np.zeros_like(both)
    inner[2:-2, 2:-2] = True
    # Rendering: the moving section through a mesh from the tiled flow, by boxes vs whole.
    stride = config.stride
    mesh = points + tiled.flow
    rendered, _ = render_section(mov, mesh, stride)
    worst = 0.0
    for y0 in range(0, size, 512):
        for x0 in range(0, size, 512):
            region = (y0, min(size, y0 + 512), x0, min(size, x0 + 512))
            pos = region_map(mesh, stride, region)
            win = source_window(pos, 3, (size, size))
            if win is None:
                continue
            part, _ = warp_region(mov[win[0]:win[1], win[2]:win[3]], (win[0], win[2]), pos, section_shape=(size, size))
            worst = max(worst, float(np.abs(part - rendered[region[0]:region[1], region[2]:region[3]]).max()))
    return {
        "size": size, "tile": tile,
        "tiled_vs_whole_px": stats(np.linalg.norm(tiled.flow - whole.flow, axis=-1)[both & inner]),
        "tiled_vs_truth_px": stats(np.linalg.norm(tiled.flow - truth, axis=-1)[tiled.valid & inner]),
        "valid_fraction_whole": round(whole.valid_fraction, 3), "valid_fraction_tiled": round(tiled.valid_fraction, 3),
        "peak_mib_whole": round(whole_peak / 2**20, 1), "peak_mib_tiled": round(tiled_peak / 2**20, 1),
        "cpu_s_whole": round(whole_s, 2), "cpu_s_tiled": round(tiled_s, 2),
        "render_boxes_vs_whole_max_abs": round(worst, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", type=int, default=250)
    parser.add_argument("--out", default=None, help="keep layers and report here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--timing-pairs", type=int, default=30)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--timing-only", type=int, default=0, metavar="RUNS",
                        help="only time the flow kernels (ours and the baseline's) RUNS times and print that")
    args = parser.parse_args()
    if not SHARED.exists():
        print(json.dumps({"skipped": f"FIB-25 not found at {SHARED}"}))
        return 0
    import imageio.v3 as iio

    from exaconnect.align.flow import FlowConfig, grid_points
    from exaconnect.align.match import AlignConfig, finalize_meshes, solve_in_memory
    from exaconnect.align.mesh import SpringMeshConfig
    from exaconnect.align.misalign import MisalignmentConfig, misalign_stack
    from exaconnect.align.quality import chunked_correlation, end_point_error, neighbor_end_point_error
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box
    from exaconnect.services.align import align_report, align_stack_through_queue, get_file, load_meshes
    from exaconnect.services.ingest import IngestOptions, ingest_now

    started = time.time()
    files = sorted((SHARED / "grayscale_maps").glob("*.png"))[: args.sections]
    original = np.stack([iio.imread(f) for f in files]).astype(np.uint8)
    n = original.shape[0]
    blank, inverted = n // 4, (2 * n) // 3
    misaligned, truth = misalign_stack(original, MisalignmentConfig(blank_sections=(blank,), inverted_sections=(inverted,)), args.seed)
    config = AlignConfig(flow=FlowConfig(patch_size=64, stride=16), mesh=SpringMeshConfig(stride=16, block_size=64, block_overlap=4))
    shape = original.shape[1:]
    good = [z for z in range(n) if z not in truth.bad_sections]

    timing_stack = misaligned[: blank - 1] if blank > args.timing_pairs + 1 else misaligned
    if args.timing_only:
        runs = [time_flow(timing_stack, args.timing_pairs, config) for _ in range(args.timing_only)]
        print(json.dumps({"bench": "align_flow_throughput", "baseline_commit": BASELINE_COMMIT, "runs": runs,
                          "load_average": round(os.getloadavg()[0], 2)}))
        return 0
    flow_speed = time_flow(timing_stack, args.timing_pairs, config)

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

    pair = neighbor_end_point_error(meshes, stride, truth, good, shape)
    absolute = end_point_error(meshes, stride, truth, good, shape)

    # The unperturbed cube through the same aligner: drift with the prior on, off, fixed window.
    identity_blocks, identity_statuses, _ = solve_in_memory(original, config)
    grid = grid_points(shape, stride)
    info: dict = {}
    identity_on = finalize_meshes(identity_blocks, shape, identity_statuses, config.mesh, info)
    identity_off = finalize_meshes(identity_blocks, shape, identity_statuses, replace(config.mesh, drift_prior="none"))
    identity_16 = finalize_meshes(identity_blocks, shape, identity_statuses, replace(config.mesh, drift_window=16.0))
    every = list(range(n))
    stack_drift = json.loads(get_file(dest, "align/drift.json") or b"null")
    # The unperturbed cube with the window the perturbed run chose: both then keep the same
    # fast part of the apparent motion, and invariance measures the matcher alone.
    same_window = (stack_drift or {}).get("window_sections") or 64.0
    identity_same = finalize_meshes(identity_blocks, shape, identity_statuses, replace(config.mesh, drift_window=same_window))

    # The perturbed run's blocks finalised with the prior off and with a fixed window, for the report.
    from exaconnect.services.align import _load_npz

    blocks = []
    for start, _ in json.loads(get_file(dest, "align/blocks.json")):
        data = _load_npz(dest, f"align/blocks/{start:05d}.npz")
        blocks.append((start, {int(z): m for z, m in zip(data["z"], data["meshes"])}))
    statuses = {s["z"]: s["status"] for s in json.loads(get_file(dest, "align/sections.json"))}
    pair_off = neighbor_end_point_error(finalize_meshes(blocks, shape, statuses, replace(config.mesh, drift_prior="none")),
                                        stride, truth, good, shape)
    pair_16 = neighbor_end_point_error(finalize_meshes(blocks, shape, statuses, replace(config.mesh, drift_window=16.0)),
                                       stride, truth, good, shape)

    vol = open_layer(dest)
    out = read_box(vol, layer_bounds(vol))
    pairs = list(zip(good[:-1], good[1:]))
    after = np.nanmean([chunked_correlation(out[a], out[b], 50, (out[a] > 0) & (out[b] > 0)) for a, b in pairs])
    before = np.nanmean([chunked_correlation(misaligned[a], misaligned[b], 50, (misaligned[a] > 0) & (misaligned[b] > 0)) for a, b in pairs])
    reference = np.nanmean([chunked_correlation(original[a], original[b], 50) for a, b in pairs])

    render_speed = time_render(misaligned, meshes, stride, 20)
    big = None if args.skip_big else big_section()

    megapixels = n * shape[0] * shape[1] / 1e6
    result = {
        "bench": "align_fib25",
        "sections": n, "section_shape": list(shape), "bad_sections": {"blank": blank, "inverted": inverted},
        "problem_sections": report["problem_sections"],
        "neighbour_px": {"median": round(pair.median, 3), "rms": round(pair.rms, 3), "p95": round(pair.p95, 3)},
        "neighbour_px_prior_off": {"median": round(pair_off.median, 3), "rms": round(pair_off.rms, 3), "p95": round(pair_off.p95, 3)},
        "neighbour_px_window16": {"median": round(pair_16.median, 3), "rms": round(pair_16.rms, 3), "p95": round(pair_16.p95, 3)},
        "invariance_px": invariance(meshes, identity_on, stride, truth, good, shape),
        "invariance_px_same_window": invariance(meshes, identity_same, stride, truth, good, shape),
        "drift_px_same_window": drift(identity_same, grid, every),
        "drift_px_prior_on": drift(identity_on, grid, every),
        "drift_px_prior_off": drift(identity_off, grid, every),
        "drift_px_window16": drift(identity_16, grid, every),
        "drift_prior_identity": info,
        "drift_prior_perturbed": stack_drift,
        "stack_epe_px": {"median": round(absolute.median, 3), "rms": round(absolute.rms, 3), "p95": round(absolute.p95, 3)},
        "correlation_original": round(float(reference), 4),
        "correlation_before": round(float(before), 4),
        "correlation_after": round(float(after), 4),
        "correlation_ratio": round(float(after / reference), 4),
        "mean_valid_flow_fraction": round(report["mean_valid_flow_fraction"], 3),
        "flow_mpix_per_cpu_s": flow_speed,
        "render_mpix_per_cpu_s": render_speed,
        "flow_stage_mpix_per_s_wall": round(megapixels / seconds["flow"], 3),
        "render_stage_mpix_per_s_wall": round(megapixels / seconds["render"], 3),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "big_section": big,
        "gpu": "none lent to this task; no SOFIMA comparison on a GPU",
        "load_average": round(os.getloadavg()[0], 2),
        "total_s": round(time.time() - started, 1),
        "report_png": report.get("png"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
