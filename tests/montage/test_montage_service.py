"""The montage stages (services/montage.py) end to end in this process: each stage's tasks made by
its stage object, sent through their payloads and executed in order, on FIB-25 sections cut into
tiles with wrong stage positions; the layer they write is the original sections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from taskqueue.registered_task import deserialize

from exaconnect.errors import InputError
from exaconnect.montage.manifest import ManifestRules, write_csv_manifest, write_tile
from exaconnect.montage.synthetic import TileCut, cut_tiles
from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box
from exaconnect.precomputed.store import ArtifactStore
from exaconnect.services import montage

SECTIONS = Path(__file__).resolve().parents[3] / "shared" / "data" / "fib25" / "training_sample2" / "grayscale_maps"
ORIGIN = (37.0, 53.0)
FIRST_Z = 5


@pytest.fixture(scope="module")
def sections():
    if not SECTIONS.is_dir():
        pytest.skip(f"real EM sections not found at {SECTIONS} (../shared is absent)")
    from PIL import Image

    return [np.asarray(Image.open(SECTIONS / f"iso.{2620 + k}.png")) for k in range(3)]


def write_tile_set(root: Path, sections, missing: dict[int, int] | None = None) -> tuple[Path, list]:
    """3 sections x 9 tiles (PNG, the middle section as TIFF), stage positions off by up to 15 px;
    `missing` {section: tile}: that tile's file is not written."""
    (root / "tiles").mkdir()
    rows, cuts = [], []
    for k, section in enumerate(sections):
        cut = cut_tiles(section, TileCut(stage_error_px=15, noise=2, seed=20 + k), ORIGIN)
        cuts.append(cut)
        if missing and k in missing:
            # The solve keeps the mean stage position of the tiles it has: make that the truth.
            present = [i for i in range(len(cut.tiles)) if i != missing[k]]
            cut.stage_xy[present] -= (cut.stage_xy - cut.true_xy)[present].mean(axis=0)
        for i, (tile, (x, y)) in enumerate(zip(cut.tiles, cut.stage_xy)):
            name = f"tiles/z{k}_{i}.{'tif' if k == 1 else 'png'}"
            if not (missing and missing.get(k) == i):
                write_tile(str(root / name), tile)
            rows.append((FIRST_Z + k, name, x, y))
    write_csv_manifest(str(root / "tiles.csv"), rows)
    return root / "tiles.csv", cuts


def run(stage):
    tasks = list(stage.make_tasks())
    for task in tasks:
        deserialize(json.dumps(task.payload())).execute()  # what a worker gets
    return tasks


def test_montage_stages_write_the_original_sections(tmp_path, sections, monkeypatch):
    manifest, _ = write_tile_set(tmp_path, sections, missing={2: 8})  # the last section's bottom-right
    layer = str(tmp_path / "montage")
    stages = montage.montage_stages(str(manifest), layer, (8, 8, 40), rules=ManifestRules(skip_missing_tiles=True),
                                    chunk_size=(64, 64, 2))
    assert [s.name for s in stages] == ["montage.match", "montage.solve", "montage.render", "montage.report",
                                        "montage.outlines"]
    assert stages[1].requires() == (stages[0],) and stages[3].requires() == (stages[2],)
    assert len(run(stages[0])) == 3 and len(run(stages[1])) == 3

    # Render: only the tiles that touch each box are read.
    reads: list[str] = []
    real_read = montage.read_tile
    monkeypatch.setattr(montage, "read_tile", lambda path: reads.append(path) or real_read(path))
    render_tasks = montage.create_montage_render_tasks(layer, (8, 8, 40), chunk_size=(64, 64, 2), task_shape=(64, 64, 2))
    corner = [t for t in render_tasks if t.box[:3] == [37, 53, FIRST_Z]][0]
    deserialize(json.dumps(corner.payload())).execute()
    assert sorted(Path(p).name for p in reads) == ["z0_0.png", "z1_0.tif"]  # z=5..6, only the top-left tiles
    monkeypatch.undo()

    run(stages[2])
    vol = open_layer(layer, layer_type="image")
    bounds = layer_bounds(vol)
    # Off the origin, and 250 x 250 x 3: not a multiple of the 64 x 64 x 2 chunks.
    assert (bounds.start, bounds.stop) == ((37, 53, FIRST_Z), (287, 303, FIRST_Z + 3))
    stack = read_box(vol, bounds)
    for k in range(2):
        diff = np.abs(stack[k].astype(float) - sections[k])
        assert diff.mean() < 2.0 and np.percentile(diff, 99) < 8, f"section {k}"
    # The last section is made without its missing tile: only that corner is empty.
    assert (stack[2][230:, 230:] == 0).all()
    assert np.abs(stack[2][:150, :150].astype(float) - sections[2][:150, :150]).mean() < 2.0

    run(stages[3])
    store = ArtifactStore(layer)
    report = montage.load_report(layer, FIRST_Z + 2)
    assert report["tiles"] == 8 and report["tiles_placed"] == 8 and report["tiles_skipped"][0]["tile"] == "z2_8.png"
    assert "does not exist" in report["tiles_skipped"][0]["reason"]
    assert report["seam_residual_max_px"] < 1.0 and report["pairs_used"] >= 9
    assert store.get("montage/report/00007.png")[:8] == b"\x89PNG\r\n\x1a\n"
    full = montage.load_report(layer, FIRST_Z)
    assert full["tiles_placed"] == 9 and full["tiles_skipped"] == [] and full["tiles_not_placed"] == []


def test_bad_manifest_fails_before_anything_is_written(tmp_path, sections):
    manifest, _ = write_tile_set(tmp_path, sections[:1])
    (tmp_path / "tiles" / "z0_4.png").unlink()
    layer = tmp_path / "montage"
    with pytest.raises(InputError, match=r"z0_4\.png.*does not exist"):
        montage.montage_stages(str(manifest), str(layer), (8, 8, 40))[0].make_tasks()
    assert not layer.exists()


def test_later_stages_refuse_to_start_early(tmp_path, sections):
    manifest, _ = write_tile_set(tmp_path, sections[:1])
    layer = str(tmp_path / "montage")
    match, solve, render, *_ = montage.montage_stages(str(manifest), layer, (8, 8, 40))
    match.make_tasks()  # tasks made, none run
    with pytest.raises(Exception, match="montage match results missing for sections \\[5\\]"):
        solve.make_tasks()


def test_montage_cli_runs_every_stage_through_the_queue_and_resumes(tmp_path, sections):
    """`exaconnect montage run TILES LAYER --resolution ... --queue ROOT`: the four stages through
    the runner and a worker; a second run skips them; --set reaches the match options."""
    from exaconnect.cli import main

    manifest, _ = write_tile_set(tmp_path, sections[:2])
    layer, queue = tmp_path / "stitched", tmp_path / "queues"
    args = ["montage", "run", str(manifest), str(layer), "--resolution", "8,8,40", "--chunk-size", "64,64,2",
            "--queue", str(queue), "--workers", "1", "--set", "match.search_px=60"]
    assert main(args) == 0
    assert (queue / "montage").is_dir()
    vol = open_layer(str(layer), layer_type="image")
    stack = read_box(vol, layer_bounds(vol))
    assert np.abs(stack[0].astype(float) - sections[0]).mean() < 2.0
    assert montage.load_report(str(layer), FIRST_Z)["tiles_placed"] == 9
    again = json.loads(main_output(main, args))
    assert {s["status"] for s in again.values()} == {"skipped"}
    assert main(args[:-2] + ["--set", "match.no_such_option=1"]) == 2


def main_output(main, args) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return out.getvalue().strip().splitlines()[-1]


def test_the_pipeline_stitches_the_built_in_sample_cut_into_tiles(tmp_path):
    """`montage: {enabled: true}` with the synthetic source: the sample is cut into tiles with
    wrong stage positions and per-tile brightness, stitched back by the montage stages, and the
    run's summary carries the montage figures; the stitched stack is the sample's own."""
    from exaconnect.pipeline import run_pipeline
    from exaconnect.pipeline_config import load_pipeline
    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

    config = tmp_path / "p.yaml"
    config.write_text(f"output: {tmp_path / 'out'}\nqueue_root: {tmp_path / 'q'}\nworkers: 1\n"
                      "source: {image: synthetic, synthetic_shape: [72, 72, 32], synthetic_seed: 3}\n"
                      "montage: {enabled: true, tile_size: 44, overlap: 16, stage_error_px: 6}\n"
                      "ingest: {chunk_size: [32, 32, 16]}\nsegment: {enabled: false}\npyramid: {num_mips: 1}\n")
    summary = run_pipeline(load_pipeline(config), progress=False)
    m = summary["montage"]
    assert m["sections"] == 32 and m["tiles_placed"] == m["tiles"] == 128 and m["pairs_used"] >= 128
    assert m["seam_residual_max_px"] < 0.5
    assert summary["stages"]["montage.render"]["status"] == "done"
    vol = open_layer(summary["layers"]["image"], layer_type="image")
    bounds = layer_bounds(vol)
    assert (bounds.start, bounds.stop) == ((0, 0, 0), (72, 72, 32))
    truth, _ = synthetic_volume(SyntheticSpec(shape=(32, 72, 72), seed=3))
    assert np.abs(read_box(vol, bounds).astype(float) - truth).mean() < 4.0  # noise 2, gain 5 %, offset 5
    again = run_pipeline(load_pipeline(config), progress=False)
    assert {s["status"] for s in again["stages"].values()} == {"skipped"}


def test_a_tile_source_stitches_its_own_tiles_and_takes_no_labels_from_the_built_in_sample(tmp_path, sections):
    """`source: {tiles: ...}` leaves source.image at its default (the built-in sample): the plan
    stitches the manifest, makes no sample and evaluates against nothing unless given labels."""
    from exaconnect.pipeline import build_plan
    from exaconnect.pipeline_config import load_pipeline

    manifest, _ = write_tile_set(tmp_path, sections)
    config = tmp_path / "p.yaml"
    config.write_text(f"output: {tmp_path / 'out'}\nqueue_root: {tmp_path / 'q'}\nsource: {{tiles: {manifest}}}\n"
                      "segment: {enabled: false}\n")
    plan = build_plan(load_pipeline(config))
    assert "groundtruth" not in plan.layers
    assert [s.name for s in plan.stages][:2] == ["montage.match", "montage.solve"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.npy"))
