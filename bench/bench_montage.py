"""Montage accuracy and throughput. Prints one JSON line.

Accuracy (issue 22): FIB-25 training_sample2 sections (250 x 250) cut into a 4 x 4 grid of
80 px tiles (23 px overlap) with stage positions off by up to ±15 px, a mild per-tile affine and
lens distortion, gain/offset and noise (montage/synthetic.py), stitched in memory
(montage/section.py); figures over `--sections` sections:
  position_error_*    solved minus true tile position (px; absolute, the errors are zero-mean);
  patch_*             patch displacement of the stitched section against the original, after
                      removing the global offset (montage/quality.py), beside the same measure
                      for the tiles pasted at their stage (nominal) and at their true positions;
  seam_residual_*     the solve's residuals of the used pairs;
  section_seconds     match + solve + render per section (CPU seconds of this process).
Rigid vs elastic (montage/elastic.py), side by side on the same cuts: `elastic_*` on tiles with a
strong per-tile affine and lens distortion (`distorted_*`, over the sections from affine 0.002, lens 2 px to
affine 0.005, lens 4 px: TileCut(affine=..., lens_px=...)), `clean_*` on tiles without any; for
each, with elastic refinement off (`*_rigid_*`) and on (`*_elastic_*`):
  *_patch_median_px, *_patch_p95_px   patch error against the original (as above);
  *_seam_median_px, *_seam_p95_px     how far apart neighbours show the same content in their
                                      overlap, each tile rendered alone (montage/quality.py);
  *_seconds                           match + solve + render per section (CPU seconds).
Throughput: a 3 x 3 grid of `--tile` px tiles (10 % overlap) of smooth random texture, match +
solve + render, in megapixels of section per CPU-second, with elastic refinement (the default)
and without, beside placing the tiles at their nominal positions (render alone: the floor of
reading and writing).

    nice -n 5 .venv/bin/python bench/bench_montage.py [--sections 10] [--tile 2000]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, require_fib25  # noqa: E402

from exaconnect.montage.elastic import ElasticConfig  # noqa: E402
from exaconnect.montage.quality import patch_errors, seam_errors  # noqa: E402
from exaconnect.montage.render import PlacedTile, render_box  # noqa: E402
from exaconnect.montage.section import MontageConfig, placed_tiles, stitch_in_memory  # noqa: E402
from exaconnect.montage.synthetic import TileCut, cut_tiles  # noqa: E402


def pasted(cut, positions, shape) -> np.ndarray:
    return render_box((0, 0, shape[1], shape[0]), [PlacedTile(t, x, y) for t, (x, y) in zip(cut.tiles, positions)],
                      cut.tiles[0].dtype)


def accuracy(sections: int) -> dict:
    from PIL import Image

    folder = require_fib25() / "grayscale_maps"
    files = sorted(folder.glob("iso.*.png"))
    picks = np.linspace(0, len(files) - 1, sections).astype(int)
    cut_spec = dict(tile_shape=(80, 80), overlap=23, stage_error_px=15, noise=3, gain=0.1, offset=10,
                    affine=0.002, lens_px=0.4)
    position, seams, seconds = [], [], []
    patches: dict[str, list] = {"stitched": [], "nominal": [], "true": []}
    uncovered = 0
    for k, index in enumerate(picks):
        section = np.asarray(Image.open(files[index]))
        cut = cut_tiles(section, TileCut(seed=k, **cut_spec))
        start = time.process_time()
        image, solved, box = stitch_in_memory(cut.tiles, cut.stage_xy, MontageConfig(), box=(0, 0, 250, 250))
        seconds.append(time.process_time() - start)
        solved_xy = np.array([[t["x"], t["y"]] for t in solved["tiles"]])
        position += list(np.hypot(*(solved_xy - cut.true_xy).T))
        seams += [p["residual_px"] for p in solved["pairs"] if p["status"] == "used"]
        for name, img in (("stitched", image), ("nominal", pasted(cut, cut.stage_xy, section.shape)),
                          ("true", pasted(cut, cut.true_xy, section.shape))):
            measure = patch_errors(img, section)
            patches[name].append(measure)
            if name == "stitched":
                uncovered += measure["uncovered"]
    out = {"sections": sections, "grid": "4x4", "tile_px": 80, "stage_error_px": 15,
           "position_error_median_px": float(np.median(position)), "position_error_max_px": float(np.max(position)),
           "seam_residual_median_px": float(np.median(seams)), "seam_residual_max_px": float(np.max(seams)),
           "section_seconds": float(np.mean(seconds)), "stitched_patches_uncovered": uncovered}
    for name, values in patches.items():
        med = [v["median_px"] for v in values if v["median_px"] is not None]
        p95 = [v["p95_px"] for v in values if v["p95_px"] is not None]
        out[f"patch_{name}_median_px"] = float(np.median(med)) if med else None
        out[f"patch_{name}_p95_px"] = float(np.median(p95)) if p95 else None
    return out


RIGID = MontageConfig(elastic=ElasticConfig(enabled=False))


def rigid_vs_elastic(sections: int) -> dict:
    from PIL import Image

    folder = require_fib25() / "grayscale_maps"
    files = sorted(folder.glob("iso.*.png"))
    picks = np.linspace(0, len(files) - 1, sections).astype(int)
    figures: dict[str, list] = {}
    for k, index in enumerate(picks):
        section = np.asarray(Image.open(files[index]))
        t = k / max(1, sections - 1)
        for case, distortion in (("distorted", dict(affine=0.002 + 0.003 * t, lens_px=2.0 + 2.0 * t)),
                                 ("clean", dict(affine=0.0, lens_px=0.0))):
            cut = cut_tiles(section, TileCut(tile_shape=(80, 80), overlap=23, stage_error_px=15, noise=3, gain=0.1,
                                             offset=10, seed=100 + k, **distortion))
            for mode, config in (("rigid", RIGID), ("elastic", MontageConfig())):
                start = time.process_time()
                image, solved, _ = stitch_in_memory(cut.tiles, cut.stage_xy, config, box=(0, 0, 250, 250))
                seconds = time.process_time() - start
                patch = patch_errors(image, section)
                used = [(p["a"], p["b"]) for p in solved["pairs"] if p["status"] == "used"]
                seam = seam_errors(placed_tiles(solved, dict(enumerate(cut.tiles))), used)
                for name, value in (("patch_median_px", patch["median_px"]), ("patch_p95_px", patch["p95_px"]),
                                    ("seam_median_px", seam["median_px"]), ("seam_p95_px", seam["p95_px"]),
                                    ("seconds", seconds)):
                    figures.setdefault(f"{case}_{mode}_{name}", []).append(value)
    return {key: float(np.median(values)) for key, values in figures.items()}


def throughput(tile: int) -> dict:
    overlap = tile // 10
    size = 3 * tile - 2 * overlap
    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), 2.0)
    section = np.clip(128 + field / field.std() * 35, 1, 254).astype(np.uint8)
    cut = cut_tiles(section, TileCut(tile_shape=(tile, tile), overlap=overlap, stage_error_px=15, noise=3, seed=1))
    start = time.process_time()
    image, solved, _ = stitch_in_memory(cut.tiles, cut.stage_xy, box=(0, 0, size, size))
    stitch = time.process_time() - start
    start = time.process_time()
    stitch_in_memory(cut.tiles, cut.stage_xy, RIGID, box=(0, 0, size, size))
    rigid = time.process_time() - start
    start = time.process_time()
    pasted(cut, cut.stage_xy, section.shape)
    nominal = time.process_time() - start
    error = np.hypot(*(np.array([[t["x"], t["y"]] for t in solved["tiles"]]) - cut.true_xy).T)
    mpix = size * size / 1e6
    return {"large_tile_px": tile, "section_mpix": mpix, "stitch_cpu_s": stitch, "rigid_stitch_cpu_s": rigid,
            "nominal_cpu_s": nominal, "stitch_mpix_per_cpu_s": mpix / stitch,
            "rigid_stitch_mpix_per_cpu_s": mpix / rigid, "nominal_mpix_per_cpu_s": mpix / nominal,
            "large_position_error_max_px": float(error.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=10)
    parser.add_argument("--tile", type=int, default=2000)
    args = parser.parse_args()
    emit("montage", **accuracy(args.sections), **rigid_vs_elastic(args.sections), **throughput(args.tile))


if __name__ == "__main__":
    main()
