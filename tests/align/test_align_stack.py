"""Alignment of real FIB-25 sections: identity (no drift), and a misaligned sub-stack with a
blank, a contrast-inverted and a folded section aligned through a real `fq://` queue by a real
worker, with the quality report; the perturbation generator and the CLI."""

import argparse
import json

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.align.flow import FlowConfig, grid_points
from exaconnect.align.match import AlignConfig, align_in_memory, config_for_shape
from exaconnect.align.mesh import SpringMeshConfig
from exaconnect.align.misalign import MisalignmentConfig, misalign_sample, misalign_stack
from exaconnect.align.quality import chunked_correlation, end_point_error, neighbor_end_point_error
from exaconnect.services.align import (align_report, align_stack_through_queue, create_align_render_tasks, get_file,
                                       load_meshes)
from exaconnect.services.ingest import IngestOptions, ingest_now

# 250 px sections: 64 px patches every 16 px (SOFIMA's 160/40 leaves almost no interior grid).
CONFIG = AlignConfig(flow=FlowConfig(patch_size=64, stride=16), mesh=SpringMeshConfig(stride=16, block_size=12, block_overlap=3))
SECTIONS = 30
BLANK, INVERTED, FOLDED = 7, 15, 22


def test_misalign_records_the_truth():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    stack = np.clip(128 + 40 * ndimage.gaussian_filter(rng.normal(size=(3, 120, 120)), (0, 2, 2)) / 0.14, 1, 255).astype(np.uint8)
    misaligned, truth = misalign_stack(stack, MisalignmentConfig(max_translation=10, blank_sections=(1,)), seed=3)
    assert misaligned.shape == stack.shape and not misaligned[1].any()
    # Pixel p of section 2 shows the original at truth.source_positions(2, p).
    p = np.array([[60.0, 60.0]])
    src = truth.source_positions(2, p)[0]
    value = ndimage.map_coordinates(stack[2].astype(float), src[:, None], order=3)[0]
    assert abs(float(misaligned[2, 60, 60]) - value) <= 1.0
    sample, sample_truth = misalign_sample(stack, seed=1)
    assert sample.shape == stack.shape and np.abs(sample_truth.translations).max() <= 12.0


def test_identity_stack_stays_put(fib25_image):
    """An unperturbed stack comes out where it went in. Matching sees the apparent motion of
    oblique neurites (~0.25 px and ~0.1 degree per section in FIB-25); chained, it bends the
    stack, which the drift prior (on by default, its window chosen from the stack) removes."""
    from dataclasses import replace

    from exaconnect.align.match import finalize_meshes, solve_in_memory

    stack = fib25_image[100:124]
    config = AlignConfig(flow=CONFIG.flow, mesh=SpringMeshConfig(stride=16, block_size=12, block_overlap=3))
    blocks, statuses, matches = solve_in_memory(stack, config)
    assert all(m.status in ("ok", "first") for m in matches.values())
    identity = grid_points(stack.shape[1:], 16)

    def displacement(mesh_config):
        meshes = finalize_meshes(blocks, stack.shape[1:], statuses, mesh_config)
        return np.stack([np.linalg.norm(meshes[z] - identity, axis=-1) for z in range(len(stack))])

    on, off = displacement(config.mesh), displacement(replace(config.mesh, drift_prior="none"))
    assert np.median(on) < 0.5 and np.percentile(on, 95) < 2.0, (np.median(on), np.percentile(on, 95))
    assert np.median(off) > 2 * np.median(on)


@pytest.fixture(scope="module")
def aligned(fib25_image, tmp_path_factory):
    """A 30-section FIB-25 sub-stack, misaligned with the truth recorded, aligned through the queue."""
    root = tmp_path_factory.mktemp("align")
    original = fib25_image[:SECTIONS]
    misaligned, truth = misalign_stack(original, MisalignmentConfig(blank_sections=(BLANK,), inverted_sections=(INVERTED,),
                                                               fold_sections=(FOLDED,)), seed=7)
    np.save(root / "misaligned.npy", misaligned)
    src, dest = str(root / "src"), str(root / "dest")
    ingest_now(str(root / "misaligned.npy"), src, IngestOptions("image", (10, 10, 10), chunk_size=(64, 64, 16)), progress=False)
    seconds = align_stack_through_queue(src, dest, str(root / "queue"), workers=1, config=CONFIG)
    report = align_report(src, dest)
    return root, original, misaligned, truth, src, dest, seconds, report


def _good(truth):
    return [z for z in range(SECTIONS) if z not in truth.bad_sections]


def test_bad_sections_are_reported_and_bridged(aligned):
    root, original, misaligned, truth, src, dest, seconds, report = aligned
    sections = {s["z"]: s for s in json.loads(get_file(dest, "align/sections.json"))}
    assert sections[BLANK]["status"] == "blank"
    assert sections[BLANK + 1]["status"] == f"skipped to {BLANK - 1}"
    assert sections[INVERTED]["status"] == "inverted"
    assert sections[INVERTED + 1]["reference"] == INVERTED - 1
    # The fold is masked, not fatal: the section still matches its neighbour.
    assert sections[FOLDED]["status"] == "ok"
    assert set(report["problem_sections"]) == {str(BLANK), str(BLANK + 1), str(INVERTED), str(INVERTED + 1)}
    assert all(sections[z]["valid_fraction"] > 0.25 for z in _good(truth) if z > 0)
    # The inverted section is aligned and rendered with its contrast restored.
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box

    vol = open_layer(dest)
    out = read_box(vol, layer_bounds(vol))
    a, b = out[INVERTED - 1], out[INVERTED]
    assert chunked_correlation(a, b, 50, (a > 0) & (b > 0)) > 0.6


def test_alignment_recovers_neighbour_geometry(aligned):
    """What matching neighbours determines, against the recorded truth: consecutive good
    sections show the same place of the original stack."""
    root, original, misaligned, truth, src, dest, seconds, report = aligned
    meshes, stride = load_meshes(dest)
    pair = neighbor_end_point_error(meshes, stride, truth, _good(truth), original.shape[1:])
    # The acceptance is median 0.5, RMS 1, P95 2 px over the whole cube (bench/bench_align.py:
    # 0.45 / 0.78 / 1.5). These first 30 sections, with a fold as well, show more apparent motion
    # of oblique neurites (0.62 median here).
    assert pair.median < 0.7 and pair.rms < 1.0 and pair.p95 < 2.0, pair.as_dict()
    # Stack-wide, that motion accumulates along z (see bench/bench_align.py); over 30 sections
    # it stays within a few pixels.
    stack_wide = end_point_error(meshes, stride, truth, _good(truth), original.shape[1:])
    assert stack_wide.median < 6.0, stack_wide.as_dict()


def test_alignment_restores_neighbour_correlation(aligned):
    root, original, misaligned, truth, src, dest, seconds, report = aligned
    good = [z for z in _good(truth) if z != FOLDED]
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box

    vol = open_layer(dest)
    out = read_box(vol, layer_bounds(vol))
    after = [chunked_correlation(out[a], out[b], 50, (out[a] > 0) & (out[b] > 0)) for a, b in zip(good[:-1], good[1:])]
    before = [chunked_correlation(misaligned[a], misaligned[b], 50, (misaligned[a] > 0) & (misaligned[b] > 0))
              for a, b in zip(good[:-1], good[1:])]
    reference = [chunked_correlation(original[a], original[b], 50) for a, b in zip(good[:-1], good[1:])]
    assert np.mean(before) < 0.3
    assert np.mean(after) >= 0.9 * np.mean(reference)
    assert report["mean_correlation_after"] > report["mean_correlation_before"] + 0.4


def test_render_is_idempotent_and_report_written(aligned):
    root, original, misaligned, truth, src, dest, seconds, report = aligned
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.layers import open_layer, read_box

    vol = open_layer(dest)
    tasks = create_align_render_tasks(src, dest)
    box = Box.from_list(tasks[0].box)
    first = read_box(vol, box)
    tasks[0].execute()
    assert np.array_equal(read_box(vol, box), first)
    assert (root / "dest" / "align" / "report.png").stat().st_size > 10_000
    assert json.loads(get_file(dest, "align/report.json"))["sections"] == SECTIONS


def test_cli_enqueue_and_report(aligned, tmp_path, capsys):
    root, original, misaligned, truth, src, dest, seconds, report = aligned
    from exaconnect.cli import main
    from exaconnect.services.queue import queue_status

    assert main(["align", "enqueue", src, str(tmp_path / "other"), "--queue", str(tmp_path / "q"),
                 "--set", "flow.patch_size=64", "--set", "flow.stride=16", "--set", "mesh.stride=16"]) == 0
    assert queue_status(str(tmp_path / "q" / "align")).enqueued == 2  # 30 sections, 16 per chunk-deep task
    stored = json.loads(get_file(str(tmp_path / "other"), "align/config.json"))
    assert stored["flow"]["patch_size"] == 64 and stored["mesh"]["stride"] == 16
    capsys.readouterr()
    assert main(["align", "report", src, dest]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sections"] == SECTIONS
    # Without options the configuration is scaled to the 250 px sections, not SOFIMA's 160 px patches.
    assert main(["align", "enqueue", src, str(tmp_path / "third"), "--queue", str(tmp_path / "q3")]) == 0
    assert json.loads(get_file(str(tmp_path / "third"), "align/config.json"))["flow"]["patch_size"] == 56
    # A mistyped option is named; nothing is enqueued.
    assert main(["align", "enqueue", src, str(tmp_path / "x"), "--queue", str(tmp_path / "q4"), "--set", "flow.strid=8"]) == 2
    assert "flow.strid" in capsys.readouterr().err
    assert not (tmp_path / "q4" / "align").exists()


def test_config_for_shape():
    assert config_for_shape((4096, 4096)).flow.patch_size == 160
    assert config_for_shape((96, 96)).flow.patch_size == 32
    assert config_for_shape((250, 250)).flow.stride == 56 // 4


def test_demo_sample_alignment():
    """The demo's path: the built-in synthetic sample, misaligned by `misalign_sample`, aligned
    with the configuration `config_for_shape` picks for 96 px sections."""
    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

    image, _ = synthetic_volume(SyntheticSpec(shape=(48, 96, 96), seed=0))
    misaligned, truth = misalign_sample(image, seed=0)
    config = config_for_shape(image.shape[1:])
    meshes, matches = align_in_memory(misaligned, config)
    assert all(m.status in ("ok", "first") for m in matches.values())
    pair = neighbor_end_point_error(meshes, config.mesh.stride, truth, list(range(len(image))), image.shape[1:],
                                    sample_step=3, margin=8)
    assert pair.median < 0.6 and pair.p95 < 1.5


def test_flow_task_matches_big_sections_in_tiles(tmp_path):
    """Sections wider than flow.tile_size are matched tile by tile from windows read off the
    layer (what a 50,000 px section needs); the fields agree with matching them whole."""
    from scipy import ndimage

    from exaconnect.align.match import match_section
    from exaconnect.services.align import create_align_flow_tasks, load_section_flow, load_section_report

    rng = np.random.default_rng(4)
    size = 576
    base = ndimage.gaussian_filter(rng.normal(size=(size + 40, size + 40)), 1.5)
    base = np.clip(128 + 35 * base / base.std(), 1, 255)
    yy, xx = np.mgrid[:size, :size].astype(float)
    sections = []
    for z, (sy, sx) in enumerate([(0.0, 0.0), (3.4, -2.2), (5.1, 1.7)]):
        wobble = 1.5 * np.sin(2 * np.pi * (xx + 50 * z) / size)
        sections.append(ndimage.map_coordinates(base, [yy + 20 + sy + wobble, xx + 20 + sx], order=3))
    stack = np.clip(np.rint(sections), 1, 255).astype(np.uint8)
    np.save(tmp_path / "big.npy", stack)
    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    ingest_now(str(tmp_path / "big.npy"), src, IngestOptions("image", (10, 10, 10), chunk_size=(128, 128, 3)), progress=False)
    config = AlignConfig(flow=FlowConfig(patch_size=48, stride=16, tile_size=256), mesh=SpringMeshConfig(stride=16))
    (task,) = create_align_flow_tasks(src, dest, config)
    task.execute()
    whole = AlignConfig(flow=FlowConfig(patch_size=48, stride=16, tile_size=0), mesh=SpringMeshConfig(stride=16))
    for z in (1, 2):
        assert load_section_report(dest, z)["status"] == "ok"
        tiled = load_section_flow(dest, z)
        reference = match_section({k: stack[k] for k in range(3)}, z, whole).field
        both = tiled.valid & reference.valid
        assert both.mean() > 0.7
        assert np.median(np.linalg.norm(tiled.flow - reference.flow, axis=-1)[both]) < 0.05
