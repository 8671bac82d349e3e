"""Elastic refinement of the montage (montage/elastic.py): flow in the overlaps, one spring mesh
per tile relaxed jointly, rendering through the mesh; on FIB-25 sections cut into tiles with a
per-tile affine and lens distortion (elastic beats rigid) and without (elastic equals rigid)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from exaconnect.errors import InputError
from exaconnect.montage.elastic import ElasticConfig, interpolate_mesh, mesh_coordinates, pair_flow
from exaconnect.montage.quality import patch_errors, seam_errors
from exaconnect.montage.render import PlacedTile, render_box, tiles_touching
from exaconnect.montage.section import MontageConfig, placed_tiles, stitch_in_memory, tile_margins
from exaconnect.montage.synthetic import TileCut, cut_tiles

SECTIONS = Path(__file__).resolve().parents[3] / "shared" / "data" / "fib25" / "training_sample2" / "grayscale_maps"
ORIGIN = (37.0, 53.0)  # off the origin, as a stage's coordinates are
BOX = (37, 53, 287, 303)
RIGID = MontageConfig(elastic=ElasticConfig(enabled=False))
DISTORTED = dict(stage_error_px=15, noise=3, gain=0.1, offset=10, affine=0.004, lens_px=3)


@pytest.fixture(scope="module")
def section():
    if not SECTIONS.is_dir():
        pytest.skip(f"real EM sections not found at {SECTIONS} (../shared is absent)")
    from PIL import Image

    return np.asarray(Image.open(SECTIONS / "iso.2613.png"))


def texture(shape, seed=0):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return np.clip(128 + field / field.std() * 35, 1, 254)


def both(section, cut_spec, seed):
    """The same cut stitched rigid and elastic: {mode: (image, solved, tiles)}."""
    cut = cut_tiles(section, TileCut(seed=seed, **cut_spec), ORIGIN)
    out = {}
    for mode, config in (("rigid", RIGID), ("elastic", MontageConfig())):
        image, solved, box = stitch_in_memory(cut.tiles, cut.stage_xy, config, box=BOX)
        out[mode] = (image, solved, placed_tiles(solved, dict(enumerate(cut.tiles))))
    return cut, out


def used_pairs(solved):
    return [(p["a"], p["b"]) for p in solved["pairs"] if p["status"] == "used"]


# ---------------------------------------------------------------- kernels

def test_pair_flow_measures_a_known_sub_pixel_residual():
    image = texture((300, 300), seed=1)
    a = image[50:150, 50:150].astype(np.uint8)
    # b's content sits 0.3 px further left than the rigid offset (75, 3) says, and 0.2 px lower.
    b = np.clip(ndimage.shift(image, (-0.2, -0.3), order=3)[53:153, 125:225], 0, 255).astype(np.uint8)
    flow = pair_flow(a, b, (75.0, 3.0), ElasticConfig())
    assert len(flow["points"]) >= 8
    vectors = np.array(flow["flow"])
    assert np.abs(vectors - (-0.3, -0.2)).max() < 0.15
    assert np.abs(vectors.mean(axis=0) - (-0.3, -0.2)).max() < 0.05
    points = np.array(flow["points"])
    assert points[:, 0].min() >= 75 and points[:, 0].max() < 100  # inside the overlap, in a's pixels
    # A rigid offset off by whole pixels is taken up by the flow, within the search range.
    off = np.array(pair_flow(a, b, (73.0, 4.0), ElasticConfig())["flow"])
    assert np.abs(off.mean(axis=0) - (-2.3, 0.8)).max() < 0.05


def test_pair_flow_keeps_nothing_on_a_blank_overlap_or_one_too_narrow():
    image = texture((120, 200), seed=2)
    a = image[:, :110].astype(np.uint8)
    blank = np.full((120, 110), 128, np.uint8)
    assert pair_flow(a, blank, (90.0, 0.0), ElasticConfig())["points"] == []
    assert pair_flow(a, image[:, 100:210].astype(np.uint8), (100.0, 0.0), ElasticConfig())["points"] == []


def test_mesh_render_of_a_constant_mesh_is_the_translated_tile():
    """A mesh that moves every pixel by the same (dx, dy) renders what a rigid tile at the
    moved position renders, in a box off the origin; the inverse map is exact for it."""
    tile = texture((90, 70), seed=3).astype(np.uint8)
    mesh = np.zeros((9, 9, 2))
    mesh[..., 0], mesh[..., 1] = 1.25, -0.75
    box = (19 - 4, 31 + 7, 19 + 61, 31 + 83)
    moved = render_box(box, [PlacedTile(tile, 19 + 1.25, 31 - 0.75)], np.float64)
    meshed = render_box(box, [PlacedTile(tile, 19.0, 31.0, mesh=mesh)], np.float64)
    assert np.abs(moved - meshed).max() < 1e-6
    rows, cols = mesh_coordinates(np.arange(19, 40), np.arange(31, 50), (19.0, 31.0), tile.shape, mesh)
    assert np.allclose(cols, np.arange(19, 40)[None, :] - 19 - 1.25)
    assert np.allclose(rows, np.arange(31, 50)[:, None] - 31 + 0.75)
    # A tile whose mesh reaches 3 px past its footprint touches a box that the rigid one misses.
    assert tiles_touching((90, 31, 100, 60), np.array([[19.0, 31.0]]), [tile.shape]) == []
    assert tiles_touching((90, 31, 100, 60), np.array([[19.0, 31.0]]), [tile.shape], [3.0]) == [0]


def test_mesh_inverse_of_a_varying_mesh_lands_on_the_pixels_it_shows():
    """For a smooth mesh (a radial field of 3 px at the corners) the rendered pixel P shows
    tile pixel u with p + u + D(u) = P to within a few hundredths of a pixel."""
    h, w = 80, 100
    ys, xs = np.meshgrid(np.linspace(-0.5, h - 0.5, 9), np.linspace(-0.5, w - 0.5, 9), indexing="ij")
    dx, dy = xs - (w - 1) / 2, ys - (h - 1) / 2
    r2 = (dx ** 2 + dy ** 2) / (((w - 1) / 2) ** 2 + ((h - 1) / 2) ** 2)
    mesh = np.stack([3 * dx * r2 / 50, 3 * dy * r2 / 50], axis=-1)
    px, py = np.arange(10, 120), np.arange(-5, 90)
    rows, cols = mesh_coordinates(px, py, (7.5, -2.0), (h, w), mesh)
    u = np.stack([cols, rows], axis=-1)
    inside = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
    landed = np.array([7.5, -2.0]) + u + interpolate_mesh(mesh, (h, w), u)
    target = np.stack(np.meshgrid(px, py), axis=-1)
    assert np.abs(landed - target)[inside].max() < 0.03


def test_elastic_config_is_strict_and_can_be_switched_off(section):
    with pytest.raises(InputError, match="elastic.stifness"):
        MontageConfig.from_dict({"elastic": {"stifness": 1.0}})
    with pytest.raises(InputError, match="elastic.enabled"):
        MontageConfig.from_dict({"elastic": {"enabled": "yes"}})
    with pytest.raises(InputError, match="mesh_cells"):
        ElasticConfig(mesh_cells=0)
    assert MontageConfig.from_dict({"elastic": {"enabled": False}}).elastic.enabled is False
    cut = cut_tiles(section, TileCut(seed=5, **DISTORTED), ORIGIN)
    _, solved, _ = stitch_in_memory(cut.tiles, cut.stage_xy, RIGID)
    assert "elastic" not in solved["summary"] and all("mesh" not in t for t in solved["tiles"])


# ---------------------------------------------------------------- real EM: rigid vs elastic

def test_elastic_beats_rigid_on_distorted_tiles(section):
    cut, runs = both(section, DISTORTED, seed=12)
    (rigid, _, rigid_tiles), (elastic, solved, elastic_tiles) = runs["rigid"], runs["elastic"]
    summary = solved["summary"]["elastic"]
    # The solve's own figure: the flow points' disagreement between their two tiles.
    assert summary["median_px"] < 0.4 * summary["rigid_median_px"] and summary["p95_px"] < 0.3
    assert summary["points"] >= 60 and summary["pairs_without_flow"] == 0
    # Measured on the images: each tile rendered alone, and the stitched section against the truth.
    pairs = used_pairs(solved)
    assert len(pairs) == 12
    seam_rigid, seam_elastic = seam_errors(rigid_tiles, pairs), seam_errors(elastic_tiles, pairs)
    assert seam_elastic["p95_px"] < 0.6 * seam_rigid["p95_px"]
    truth_rigid, truth_elastic = patch_errors(rigid, section), patch_errors(elastic, section)
    assert truth_elastic["uncovered"] == 0
    assert truth_elastic["median_px"] < 0.5 * truth_rigid["median_px"]
    assert truth_elastic["p95_px"] < 0.5 * truth_rigid["p95_px"] and truth_elastic["p95_px"] < 0.4
    # The meshes stay small and the positions are the rigid solve's.
    assert 0.5 < summary["max_displacement_px"] < 6
    assert all(t["x"] == r["x"] for t, r in zip(solved["tiles"], runs["rigid"][1]["tiles"]))


def test_elastic_equals_rigid_on_undistorted_tiles(section):
    cut, runs = both(section, dict(stage_error_px=15, noise=3, gain=0.1, offset=10), seed=13)
    (rigid, _, _), (elastic, solved, _) = runs["rigid"], runs["elastic"]
    assert max(tile_margins(solved)) < 0.3
    truth_rigid, truth_elastic = patch_errors(rigid, section), patch_errors(elastic, section)
    assert abs(truth_elastic["median_px"] - truth_rigid["median_px"]) <= 0.05
    assert truth_elastic["p95_px"] <= truth_rigid["p95_px"] + 0.05
    assert np.abs(elastic.astype(float) - rigid).mean() < 1.0


def test_elastic_through_the_solve_and_render_tasks(tmp_path, section):
    """The solve task stores each tile's mesh in the section JSON; the render task reads it
    back and renders through it, box by box, the same image as the stitch in memory."""
    from taskqueue.registered_task import deserialize

    from exaconnect.montage.manifest import read_tile, write_csv_manifest, write_tile
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box
    from exaconnect.precomputed.store import ArtifactStore
    from exaconnect.services import montage

    cut = cut_tiles(section, TileCut(seed=14, **DISTORTED), ORIGIN)
    (tmp_path / "tiles").mkdir()
    rows = []
    for i, (tile, (x, y)) in enumerate(zip(cut.tiles, cut.stage_xy)):
        write_tile(str(tmp_path / "tiles" / f"t{i}.png"), tile)
        rows.append((3, f"tiles/t{i}.png", x, y))
    write_csv_manifest(str(tmp_path / "tiles.csv"), rows)
    layer = str(tmp_path / "out")
    stages = montage.montage_stages(str(tmp_path / "tiles.csv"), layer, (8, 8, 40), chunk_size=(64, 64, 1))
    for stage in stages[:3]:
        if stage.name == "montage.render":
            tasks = montage.create_montage_render_tasks(layer, (8, 8, 40), chunk_size=(64, 64, 1),
                                                        task_shape=(64, 64, 1))
        else:
            tasks = stage.make_tasks()
        for task in tasks:
            deserialize(json.dumps(task.payload())).execute()
    solved = ArtifactStore(layer).get_json("montage/solve/00003.json")
    assert all(len(t["mesh"]["dx"]) == 9 for t in solved["tiles"])
    vol = open_layer(layer, layer_type="image")
    bounds = layer_bounds(vol)
    stored = read_box(vol, bounds)[0]
    box = (bounds.start[0], bounds.start[1], bounds.stop[0], bounds.stop[1])
    # The tile set's own order (the manifest's tiles sorted): pairs, flows and meshes alike.
    tiles = montage.load_tile_set(layer).section(3)
    in_memory, _, _ = stitch_in_memory([read_tile(t.path) for t in tiles], np.array([[t.x, t.y] for t in tiles]), box=box)
    assert np.array_equal(stored, in_memory)
    assert patch_errors(stored, section)["p95_px"] < 0.4


def test_pairs_without_flow_hold_their_tiles_rigidly_and_old_match_results_solve_rigid(section):
    """An overlap too narrow for flow patches keeps the pair's rigid offset as its only spring,
    so the section comes out as the rigid one; a match result from before elastic refinement
    (no flows) is solved rigid, not refused."""
    from exaconnect.montage.section import measure_section, solve_section

    cut = cut_tiles(section, TileCut(stage_error_px=15, noise=3, seed=15), ORIGIN)
    shapes = [t.shape for t in cut.tiles]
    # 25 px overlaps leave 7 px for a patch searched +-8 px: less than the 8 px smallest patch.
    config = MontageConfig(elastic=ElasticConfig(search_px=8))
    measured = measure_section(cut.stage_xy, shapes, lambda i: cut.tiles[i], config)
    solved = solve_section(cut.stage_xy, measured, config)
    summary = solved["summary"]
    assert summary["pairs_used"] == 12
    assert summary["elastic"]["pairs_without_flow"] == 12
    assert max(tile_margins(solved)) < 0.2
    old = {k: v for k, v in measured.items() if k not in ("flows", "shapes")}
    rigid = solve_section(cut.stage_xy, old, config)
    assert "elastic" not in rigid["summary"] and all("mesh" not in t for t in rigid["tiles"])
    assert [t["x"] for t in rigid["tiles"]] == [t["x"] for t in solved["tiles"]]
