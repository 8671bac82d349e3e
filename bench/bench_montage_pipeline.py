"""The whole pipeline from tiles (issue 22): every section of FIB-25 training_sample2 cut into a
grid of overlapping tiles (montage/synthetic.py: stage positions off by up to ±15 px, a mild
per-tile affine and lens distortion, gain/offset and noise) listed in a CSV manifest;
`exaconnect run` with `source.tiles` stitches, aligns and segments a crop with the published
FFN checkpoint; the same pipeline from the original sections; the two compared. Prints one JSON
line.

Each stitched section keeps the mean of its tiles' stage positions, so the stitched stack jitters
by a few pixels from section to section (what alignment removes) and, once aligned, may sit a
whole pixel or two off the original frame. Each run is therefore done in two steps: montage and
alignment first; then the integer x/y offset of its aligned stack against the original sections
is measured (phase correlation over the crop) and the segmentation crop is placed on the same
tissue in both runs. Figures:
  offset_px                 the aligned stack's offset against the original, per run;
  aligned_patch_*           how far the aligned stack from tiles still is from the original,
                            section by section after the global offset (montage/quality.py);
  vi_between / are_between  the segmentation from tiles against the one from sections;
  from_tiles / from_sections  each against the ground truth (label 0 one segment, no voxel left out);
  seconds                   wall time of each run's steps.

    nice .venv/bin/python bench/bench_montage_pipeline.py [--crop 70,60,90,166,156,186] [--workdir DIR]

About 15 minutes on a 2-core CPU, most of it the two FFN crops.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, emit, require_fib25  # noqa: E402

CHECKPOINT = SHARED / "models" / "ffn-fib25" / "model.ckpt-27465036"
CUT = dict(tile_shape=(100, 100), overlap=25, stage_error_px=15, noise=3, gain=0.1, offset=10, affine=0.002, lens_px=0.4)


def write_tile_set(folder: Path, sections: list[Path]) -> Path:
    """Each section cut into tiles (PNG), and the CSV manifest with their (wrong) stage positions."""
    from PIL import Image
    from tqdm import tqdm

    from exaconnect.montage.manifest import write_csv_manifest, write_tile
    from exaconnect.montage.synthetic import TileCut, cut_tiles

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for z, path in enumerate(tqdm(sections, desc="cutting tiles", unit="section")):
        cut = cut_tiles(np.asarray(Image.open(path)), TileCut(seed=z, **CUT))
        for index, (tile, (x, y)) in enumerate(zip(cut.tiles, cut.stage_xy)):
            name = f"z{z:03d}_t{index:02d}.png"
            write_tile(str(folder / name), tile)
            rows.append((z, name, float(x), float(y)))
    manifest = folder / "tiles.csv"
    write_csv_manifest(str(manifest), rows)
    return manifest


def run_pipeline(config: dict, folder: Path, sets: list[str]) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    command = [sys.executable, "-m", "exaconnect.cli", "run", str(path)] + [a for s in sets for a in ("--set", s)]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    return time.perf_counter() - started


def base_config(name: str, folder: Path, source: dict) -> dict:
    return {
        "name": name, "output": str(folder / "output"), "queue_root": str(folder / "queues"), "workers": 2,
        "source": {"resolution": [10.0, 10.0, 10.0], **source},
        # Small chunks: the FFN's box must start on the chunk grid, so the crop placed on the same
        # tissue in both runs grows by less than a chunk.
        "ingest": {"chunk_size": [16, 16, 16]},
        "align": {"enabled": True},
        "segment": {"enabled": False, "model": str(CHECKPOINT), "subvolume": [64, 64, 64], "overlap": [16, 16, 16]},
        "pyramid": {"num_mips": 1},
        "mesh": {"enabled": False}, "skeletons": {"enabled": False}, "evaluate": {"enabled": False},
    }


def aligned_offset(layer: str, original: np.ndarray, crop: tuple[int, ...]) -> tuple[int, int]:
    """The integer (dx, dy) at which the aligned layer shows the original's crop: the peak of the
    phase correlation of the crop's mean-free sections, summed over the crop's z range."""
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.layers import open_layer, read_box

    x0, y0, z0, x1, y1, z1 = crop
    margin = 24
    volume = read_box(open_layer(layer), Box((x0 - margin, y0 - margin, z0), (x1 + margin, y1 + margin, z1)))
    reference = original[z0:z1, y0 - margin:y1 + margin, x0 - margin:x1 + margin].astype(np.float64)
    moving = volume.astype(np.float64)
    spectrum = np.zeros(reference.shape[1:], complex)
    for a, b in zip(reference, moving):
        fa, fb = np.fft.fft2(a - a.mean()), np.fft.fft2(b - b.mean())
        cross = np.conj(fa) * fb
        spectrum += cross / np.maximum(np.abs(cross), 1e-9)
    peak = np.unravel_index(np.argmax(np.fft.ifft2(spectrum).real), spectrum.shape)
    dy, dx = [int(p) if p <= s // 2 else int(p - s) for p, s in zip(peak, spectrum.shape)]
    return dx, dy


def grid_box(layer: str, box: list[int]) -> list[int]:
    """`box` (x0, y0, z0, x1, y1, z1) grown to the layer's chunk grid, within its bounds."""
    from exaconnect.precomputed.layers import layer_bounds, open_layer

    vol = open_layer(layer)
    offset, chunk = vol.voxel_offset, vol.chunk_size
    bounds = layer_bounds(vol)
    start = [int(o + (b - o) // c * c) for b, o, c in zip(box[:3], offset, chunk)]
    stop = [int(min(s, o - (-(b - o) // c) * c)) for b, o, c, s in zip(box[3:], offset, chunk, bounds.stop)]
    return start + stop


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crop", default="70,60,90,166,156,186", help="x0,y0,z0,x1,y1,z1 of the original frame")
    parser.add_argument("--sections", type=int, default=250, help="the first N sections (the whole stack: 250)")
    parser.add_argument("--workdir", default=None, help="keep everything here (default: a temp dir); reruns resume")
    args = parser.parse_args()
    fib25 = require_fib25()
    if not Path(str(CHECKPOINT) + ".index").exists():
        print(json.dumps({"skipped": f"FFN checkpoint not found at {CHECKPOINT}"}))
        return 0
    import h5py
    from PIL import Image

    from exaconnect.montage.quality import patch_errors
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.evaluate import segmentation_metrics
    from exaconnect.precomputed.layers import open_layer, read_box

    crop = tuple(int(v) for v in args.crop.split(","))
    x0, y0, z0, x1, y1, z1 = crop
    if z1 > args.sections:
        parser.error(f"--crop reaches z={z1}; only {args.sections} sections")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_montage_pipeline_"))
    files = sorted((fib25 / "grayscale_maps").glob("*.png"))[:args.sections]
    original = np.stack([np.asarray(Image.open(f)) for f in files])
    sections = work / "sections"
    if not (sections / f"{len(files) - 1:04d}.png").exists():  # ingest reads a folder of sections in name order
        sections.mkdir(parents=True, exist_ok=True)
        for z, f in enumerate(files):
            (sections / f"{z:04d}.png").write_bytes(f.read_bytes())
    manifest = work / "tiles" / "tiles.csv"
    if not manifest.exists():
        write_tile_set(manifest.parent, files)

    runs = {"tiles": base_config("from-tiles", work / "tiles_run", {"image": "synthetic", "tiles": str(manifest)}),
            "sections": base_config("from-sections", work / "sections_run", {"image": str(sections)})}
    seconds: dict[str, dict] = {}
    offsets, segmentations = {}, {}
    for name, config in runs.items():
        folder = Path(config["output"]).parent
        seconds[name] = {"montage_align_s": round(run_pipeline(config, folder, []), 1)}
        aligned = f"file://{config['output']}/aligned"
        dx, dy = aligned_offset(aligned, original, crop)
        offsets[name] = [dx, dy]
        box = [x0 + dx, y0 + dy, z0, x1 + dx, y1 + dy, z1]
        config["segment"].update(enabled=True, bbox=grid_box(aligned, box))
        seconds[name]["segment_s"] = round(run_pipeline(config, folder, []), 1)
        segmentations[name] = read_box(open_layer(f"file://{config['output']}/segmentation"),
                                       Box(tuple(box[:3]), tuple(box[3:])))
        if name == "tiles":
            stack = read_box(open_layer(aligned), Box(tuple(box[:3]), tuple(box[3:])))
            measures = [patch_errors(a, b) for a, b in zip(stack, original[z0:z1, y0:y1, x0:x1])]
            medians = [m["median_px"] for m in measures if m["median_px"] is not None]
            p95s = [m["p95_px"] for m in measures if m["p95_px"] is not None]
    with h5py.File(fib25 / "groundtruth.h5", "r") as f:
        truth = np.asarray(f["stack"][z0:z1, y0:y1, x0:x1])
    between = segmentation_metrics(segmentations["tiles"], segmentations["sections"])
    emit("montage_pipeline", sections=len(files), tiles=sum(1 for _ in open(manifest)) - 1, crop=list(crop),
         cut={k: list(v) if isinstance(v, tuple) else v for k, v in CUT.items()},
         offset_px=offsets, aligned_patch_median_px=round(float(np.median(medians)), 3) if medians else None,
         aligned_patch_p95_px=round(float(np.median(p95s)), 3) if p95s else None,
         vi_between=round(between["vi"], 4), are_between=round(between["adapted_rand_error"], 4),
         from_tiles=segmentation_metrics(segmentations["tiles"], truth),
         from_sections=segmentation_metrics(segmentations["sections"], truth),
         seconds=seconds, workdir=str(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
