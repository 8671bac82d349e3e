"""Montage kernels (montage/): matching, solving, intensity, rendering, on synthetic texture and on
FIB-25 sections cut into overlapping tiles with wrong stage positions, and the hard cases
(blank, saturated, isolated, out-of-range tiles, a bad pair)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from exaconnect.errors import InputError
from exaconnect.montage.intensity import solve_intensity
from exaconnect.montage.match import MatchConfig, match_pair, masked_ncc, neighbour_pairs
from exaconnect.montage.render import PlacedTile, render_box, tiles_touching
from exaconnect.montage.section import MontageConfig, stitch_in_memory
from exaconnect.montage.solve import SolveConfig, solve_positions
from exaconnect.montage.synthetic import TileCut, cut_tiles

SECTIONS = Path(__file__).resolve().parents[3] / "shared" / "data" / "fib25" / "training_sample2" / "grayscale_maps"
ORIGIN = (37.0, 53.0)  # off the origin, as a stage's coordinates are


def texture(shape, seed=0, dtype=np.uint8):
    """Blobby random texture with EM-like contrast (smoothed noise)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    field = (field - field.mean()) / field.std()
    top = np.iinfo(dtype).max
    return np.clip(top / 2 + field * top / 7, 1, top - 1).astype(dtype)


@pytest.fixture(scope="module")
def section():
    if not SECTIONS.is_dir():
        pytest.skip(f"real EM sections not found at {SECTIONS} (../shared is absent)")
    from PIL import Image

    return np.asarray(Image.open(SECTIONS / "iso.2610.png"))


def errors(solved, truth):
    positions = np.array([[t["x"], t["y"]] for t in solved["tiles"]])
    return np.hypot(*(positions - truth).T)


def relative_errors(solved, truth, tiles):
    """Position errors of `tiles` after removing their common offset (a group of tiles cut off
    from the rest is only placed as well as the mean of its stage positions)."""
    positions = np.array([[solved["tiles"][i]["x"], solved["tiles"][i]["y"]] for i in tiles])
    diff = positions - truth[tiles]
    return np.hypot(*(diff - diff.mean(axis=0)).T)


def expected_image(section, solved, truth, tiles, box):
    """The section as the tiles in `tiles` place it: shifted by their common offset, in `box`."""
    positions = np.array([[solved["tiles"][i]["x"], solved["tiles"][i]["y"]] for i in tiles])
    dx, dy = (positions - truth[tiles]).mean(axis=0)
    padded = np.pad(section.astype(float), 60, mode="edge")
    shifted = ndimage.shift(padded, (dy, dx), order=1)
    y0, x0 = int(box[1] - ORIGIN[1]) + 60, int(box[0] - ORIGIN[0]) + 60
    return shifted[y0: y0 + box[3] - box[1], x0: x0 + box[2] - box[0]]


# ---------------------------------------------------------------- match

def test_masked_ncc_matches_direct_correlation():
    rng = np.random.default_rng(1)
    fixed, moving = rng.normal(size=(12, 15)), rng.normal(size=(9, 7))
    fixed_mask, moving_mask = rng.random((12, 15)) > 0.2, rng.random((9, 7)) > 0.2
    ncc, count = masked_ncc(fixed, fixed_mask, moving, moving_mask)
    for sy, sx in [(0, 0), (3, -2), (-4, 5), (6, 8)]:
        i, j = sy + moving.shape[0] - 1, sx + moving.shape[1] - 1
        a, b = [], []
        for y in range(moving.shape[0]):
            for x in range(moving.shape[1]):
                fy, fx = y + sy, x + sx
                if 0 <= fy < 12 and 0 <= fx < 15 and fixed_mask[fy, fx] and moving_mask[y, x]:
                    a.append(fixed[fy, fx])
                    b.append(moving[y, x])
        assert count[i, j] == len(a)
        assert ncc[i, j] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-9)


def test_match_pair_finds_offset_far_from_nominal_on_16_bit_tiles():
    image = texture((300, 300), seed=2, dtype=np.uint16)
    a, b = image[50:250, 20:170], image[57:257, 140:290]  # b at (+120, +7) from a
    result = match_pair(a, b, nominal=(120 - 43, 7 + 38), config=MatchConfig())
    assert result.trusted, result.reason
    assert result.offset == pytest.approx((120, 7), abs=0.2)
    # Beyond the search radius (50 px) the true offset cannot be found and the pair is not trusted.
    far = match_pair(a, b, nominal=(120 - 80, 7), config=MatchConfig())
    assert not far.trusted and far.reason


def test_search_radius_is_the_larger_of_pixels_and_fraction():
    assert MatchConfig(search_px=50, search_fraction=0.1).radius((2000, 3000)) == 200
    assert MatchConfig(search_px=50, search_fraction=0.1).radius((100, 100)) == 50
    with pytest.raises(InputError, match="search_fraction"):
        MatchConfig(search_fraction=2)


def test_blank_and_saturated_pairs_are_untrusted_with_a_reason():
    image = texture((120, 200), seed=3)
    a = image[:, :110]
    blank = np.full((120, 110), 128, np.uint8)
    saturated = np.full((120, 110), 255, np.uint8)
    assert "low texture" in match_pair(a, blank, (90, 0), MatchConfig()).reason
    assert "no usable pixels" in match_pair(a, saturated, (90, 0), MatchConfig()).reason


def test_diagonal_tiles_are_not_neighbours():
    positions = np.array([[0, 0], [90, 0], [0, 90], [90, 90]], float)
    assert neighbour_pairs(positions, [(100, 100)] * 4, MatchConfig()) == [(0, 1), (0, 2), (1, 3), (2, 3)]


# ---------------------------------------------------------------- solve and intensity

def grid_problem(rows=4, cols=5, step=90.0, error=20.0, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.array([[c * step, r * step] for r in range(rows) for c in range(cols)], float)
    stage = truth + rng.uniform(-error, error, truth.shape)
    pairs = [(r * cols + c, r * cols + c + 1) for r in range(rows) for c in range(cols - 1)]
    pairs += [(r * cols + c, (r + 1) * cols + c) for r in range(rows - 1) for c in range(cols)]
    offsets = np.array([truth[b] - truth[a] for a, b in pairs])
    return truth, stage, pairs, offsets


def test_solve_recovers_positions_and_rejects_a_bad_pair():
    truth, stage, pairs, offsets = grid_problem()
    offsets = offsets + np.random.default_rng(1).normal(0, 0.1, offsets.shape)
    offsets[7] += (25.0, -18.0)  # one wildly wrong match
    solution = solve_positions(stage, pairs, offsets)
    assert solution.rejected == [7]
    shift = (solution.positions - truth).mean(axis=0)
    assert np.abs(shift - (stage - truth).mean(axis=0)).max() < 1e-2  # anchored at the stage mean
    assert np.hypot(*(solution.positions - truth - shift).T).max() < 0.5
    # Without rejection the bad pair drags its neighbours by pixels.
    dragged = solve_positions(stage, pairs, offsets, SolveConfig(max_residual_px=1e6))
    assert np.hypot(*(dragged.positions - truth - shift).T).max() > 3


def test_solve_keeps_stage_position_of_a_tile_without_pairs():
    truth, stage, pairs, offsets = grid_problem(rows=2, cols=3)
    keep = [k for k, (a, b) in enumerate(pairs) if 5 not in (a, b)]
    solution = solve_positions(stage, [pairs[k] for k in keep], offsets[keep])
    assert solution.unplaced == [5]
    assert solution.positions[5] == pytest.approx(stage[5], abs=1e-6)


def test_intensity_recovers_gain_and_offset():
    rng = np.random.default_rng(4)
    gains, offsets = rng.uniform(0.8, 1.2, 6), rng.uniform(-20, 20, 6)
    pairs = [(0, 1), (1, 2), (3, 4), (4, 5), (0, 3), (1, 4), (2, 5)]
    stats = []
    for a, b in pairs:
        mean, std = rng.uniform(100, 150), rng.uniform(20, 40)  # the same content seen by both tiles
        stats.append([gains[a] * mean + offsets[a], gains[a] * std, gains[b] * mean + offsets[b], gains[b] * std])
    gain, offset = solve_intensity(6, pairs, np.array(stats))
    # corrected = gain * (g * v + o) must be the same affine function of v for every tile
    scale, shift = gain * gains, gain * offsets + offset
    assert np.ptp(scale) < 1e-3 and np.ptp(shift) < 0.1


# ---------------------------------------------------------------- render

def test_render_box_reads_only_touching_tiles_and_is_seam_free():
    image = texture((130, 170), seed=5).astype(np.uint8)
    tiles = [(image[0:80, 0:100], 0, 0), (image[0:80, 70:170], 70, 0), (image[50:130, 0:100], 0, 50),
             (image[50:130, 70:170], 70, 50)]
    positions = np.array([[x + 11.0, y + 7.0] for _, x, y in tiles])
    shapes = [t.shape for t, _, _ in tiles]
    box = (11 + 3, 7 + 5, 11 + 61, 7 + 41)  # inside tile 0 only: odd size, off the origin
    assert tiles_touching(box, positions, shapes) == [0]
    full = (11, 7, 11 + 170, 7 + 130)
    placed = [PlacedTile(t, *positions[i]) for i, (t, _, _) in enumerate(tiles)]
    assert np.array_equal(render_box(full, placed, np.uint8), image)
    assert np.array_equal(render_box(box, [placed[0]], np.uint8), image[5:41, 3:61])
    # Sub-pixel positions: bilinear resampling, no seams, same image within interpolation error.
    shifted = [PlacedTile(t.pixels, t.x + 0.25, t.y - 0.25) for t in placed]
    out = render_box(full, shifted, np.uint8).astype(float)
    reference = ndimage.shift(image.astype(float), (-0.25, 0.25), order=1, mode="nearest")
    assert np.abs(out - reference)[2:-2, 2:-2].max() <= 1


# ---------------------------------------------------------------- real EM, end to end in memory

def test_real_em_tiles_are_placed_within_one_pixel(section):
    cut = cut_tiles(section, TileCut(stage_error_px=15, noise=3, gain=0.1, offset=10, affine=0.002, lens_px=0.4,
                                     seed=11), ORIGIN)
    assert np.abs(cut.stage_xy - cut.true_xy).max() > 10
    image, solved, box = stitch_in_memory(cut.tiles, cut.stage_xy)
    assert solved["summary"]["tiles_placed"] == 9 and solved["summary"]["pairs_rejected"] == 0
    assert errors(solved, cut.true_xy).max() < 1.0
    assert solved["summary"]["seam_residual_max_px"] < 1.0
    assert box == (37, 53, 37 + 250, 53 + 250)
    # The stitched section is the original within the noise and gain the tiles were given.
    corrected = image.astype(float)
    assert np.corrcoef(corrected.ravel(), section.astype(float).ravel())[0, 1] > 0.97


def test_real_em_clean_tiles_render_the_original(section):
    cut = cut_tiles(section, TileCut(stage_error_px=20, seed=3), ORIGIN)
    image, solved, box = stitch_in_memory(cut.tiles, cut.stage_xy)
    assert errors(solved, cut.true_xy).max() < 0.1
    assert box == (37, 53, 287, 303)
    assert np.abs(image.astype(int) - section).mean() < 0.1


@pytest.mark.parametrize("case", ["blank", "saturated"])
def test_blank_or_saturated_tile_is_reported_and_the_rest_stitched(section, case):
    cut = cut_tiles(section, TileCut(stage_error_px=15, noise=2, seed=7), ORIGIN)
    tiles = list(cut.tiles)
    tiles[4] = np.full_like(tiles[4], 128 if case == "blank" else 255)
    image, solved, box = stitch_in_memory(tiles, cut.stage_xy)
    summary = solved["summary"]
    assert summary["tiles_at_stage_position"] == [4]
    assert solved["tiles"][4]["reason"] == ("tile is blank" if case == "blank" else "tile is no signal")
    others = [i for i in range(9) if i != 4]
    assert relative_errors(solved, cut.true_xy, others).max() < 1.0
    # Where the good tiles cover the section it is still made: the blank tile does not show.
    expected = expected_image(section, solved, cut.true_xy, others, box)
    assert np.abs(image[5:60, 5:-5] - expected[5:60, 5:-5]).mean() < 3
    centre = image[110:140, 110:140]  # only the bad tile covers the centre
    assert (centre == (128 if case == "blank" else 255)).all()


def test_isolated_tile_keeps_its_stage_position(section):
    cut = cut_tiles(section, TileCut(stage_error_px=15, seed=8), ORIGIN)
    tiles = list(cut.tiles) + [cut.tiles[0]]
    stage = np.vstack([cut.stage_xy, [ORIGIN[0] + 420.0, ORIGIN[1] + 10.0]])
    image, solved, box = stitch_in_memory(tiles, stage)
    assert solved["summary"]["tiles_at_stage_position"] == [9]
    assert solved["tiles"][9]["reason"] == "no neighbour within the search range"
    assert (solved["tiles"][9]["x"], solved["tiles"][9]["y"]) == pytest.approx((457.0, 63.0))
    assert errors(solved, np.vstack([cut.true_xy, [[457.0, 63.0]]]))[:9].max() < 1.0
    assert box[2] == 457 + 100
    assert np.array_equal(image[10:110, 420:520], cut.tiles[0])


def test_tile_beyond_the_search_range_is_reported_not_misplaced(section):
    cut = cut_tiles(section, TileCut(stage_error_px=10, seed=9), ORIGIN)
    stage = cut.stage_xy.copy()
    stage[8] += (80.0, 0.0)  # further off than the ±50 px search
    _, solved, _ = stitch_in_memory(cut.tiles, stage)
    assert solved["summary"]["tiles_at_stage_position"] == [8]
    assert solved["tiles"][8]["reason"].startswith("pair with")
    assert relative_errors(solved, cut.true_xy, list(range(8))).max() < 1.0


def test_missing_tile_leaves_a_hole_and_the_rest_is_made(section):
    cut = cut_tiles(section, TileCut(stage_error_px=15, seed=10), ORIGIN)
    keep = [i for i in range(9) if i != 2]  # the top-right tile's file is missing
    image, solved, box = stitch_in_memory([cut.tiles[i] for i in keep], cut.stage_xy[keep])
    assert solved["summary"]["tiles_placed"] == 8
    assert relative_errors(solved, cut.true_xy[keep], list(range(8))).max() < 1.0
    x0 = box[0] - 37
    assert (image[0:60, 200 - x0:250 - x0] == 0).all()  # only the missing tile covered this corner


def test_montage_config_rejects_unknown_keys():
    with pytest.raises(InputError, match="serch_px"):
        MontageConfig.from_dict({"match": {"serch_px": 3}})
    assert MontageConfig.from_dict({"match": {"search_px": 60}}).match.search_px == 60


def test_a_section_without_a_single_trusted_pair_keeps_every_stage_position():
    """The solve with no pair at all (every tile blank, or tiles too small to trust a match)
    places each tile at its stage position and reports them, instead of failing the task."""
    from exaconnect.montage.solve import solve_positions

    stage = np.array([[3.0, 4.0], [50.0, 4.5], [3.5, 51.0]])
    solution = solve_positions(stage, [], np.zeros((0, 2)))
    assert np.allclose(solution.positions, stage)
    assert sorted(solution.unplaced) == [0, 1, 2]


@pytest.mark.parametrize("shapes", [((40, 60), (35, 50)), ((17, 90), (23, 88)), ((64, 64), (64, 64))])
def test_unmasked_ncc_from_summed_area_tables_equals_the_masked_correlations(shapes, monkeypatch):
    """The fast path (three FFTs, overlap sums from summed-area tables) against the masked one
    (twelve FFTs), on crops of different, odd shapes: the same scores and counts at every shift."""
    from exaconnect.montage import match

    rng = np.random.default_rng(7)
    fixed, moving = rng.normal(100, 30, shapes[0]), rng.normal(100, 30, shapes[1])
    full_f, full_m = np.ones(fixed.shape, bool), np.ones(moving.shape, bool)
    fast = match.masked_ncc(fixed, full_f, moving, full_m)
    monkeypatch.setattr(match, "SCATTERED_MASKED_FRACTION", -1.0)
    masked = match.masked_ncc(fixed, full_f, moving, full_m)
    assert np.abs(fast[0] - masked[0]).max() < 1e-9 and np.array_equal(fast[1], masked[1])


def test_scattered_saturated_pixels_do_not_move_the_peak(monkeypatch):
    from exaconnect.montage import match

    rng = np.random.default_rng(8)
    field = ndimage.gaussian_filter(rng.normal(size=(120, 160)), 2.0)
    image = np.clip(128 + field / field.std() * 40, 0, 255).astype(np.uint8)
    holes = rng.random(image.shape) < 0.003
    image[holes] = 255
    fixed, moving = image[10:90, 0:100], image[17:97, 23:123]  # moving's (0, 0) on fixed's (7, 23)
    args = (fixed.astype(float), match.signal_mask(fixed), moving.astype(float), match.signal_mask(moving))
    assert match._scattered(args[1]) and not args[1].all()
    for fraction in (0.005, -1.0):
        monkeypatch.setattr(match, "SCATTERED_MASKED_FRACTION", fraction)
        ncc, count = match.masked_ncc(*args)
        enough = count >= 2000
        i, j = np.unravel_index(np.argmax(np.where(enough, ncc, -1)), ncc.shape)
        assert (i - (moving.shape[0] - 1), j - (moving.shape[1] - 1)) == (7, 23)
