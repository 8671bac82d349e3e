"""Refinement stages (services/refine.py) through the runner: P2 and P3 over a volume cut into
several subvolumes, off the origin and off the chunk grid at its far end.

With the oracle network (inside = the intensity at the FOV centre) the result is known: P2
must fill an unclaimed region that spans subvolumes as ONE object without touching claimed
voxels, and P3 must join the pieces of a region split at a subvolume face and never join two
regions. With the tiny real FFN the invariants and resuming are checked."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from exaconnect.ffn.agglomerate import MergeThresholds, ResegmentOptions
from exaconnect.ffn.config import FFNConfig, InferenceOptions, ModelConfig
from exaconnect.ffn.reseed import ReseedOptions
from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, open_layer, read_box, write_box
from exaconnect.services import refine
from exaconnect.services.refine import (
    AgglomeratePlan,
    FillPlan,
    RefineGrid,
    ReseedPlan,
    agglomerate_stages,
    fill_stages,
    read_report,
    reseed_stages,
)
from exaconnect.services.runner import RunnerOptions, run_stages

OFFSET = (8, 16, 24)   # x, y, z: off the origin
SIZE = (47, 39, 37)    # x, y, z: off the chunk grid (chunk 8) at the far end
CHUNK = (8, 8, 8)


@dataclass
class OracleNetwork:
    """Stands in for a loaded Predictor: inside = the FOV centre's intensity."""

    config: FFNConfig

    @property
    def model_config(self):
        return self.config.model

    def at_precision(self, precision):
        return self

    def __call__(self, images, mask_logits):
        centre = images[:, 4, 4, 4][:, None, None, None]
        z, y, x = np.mgrid[-4:5, -4:5, -4:5]
        return np.where(images == centre, 3.0 + np.exp(-(z**2 + y**2 + x**2) / 20.0), -4.0).astype(np.float32)


def _volume():
    """Regions along x at intensities 100 / 150 / 200 between dark one-voxel membranes."""
    shape = tuple(reversed(SIZE))
    image = np.full(shape, 20, np.uint8)
    truth = np.zeros(shape, np.uint64)
    for k, (lo, hi, value) in enumerate([(0, 15, 100), (16, 31, 150), (32, SIZE[0], 200)], start=1):
        image[:, :, lo:hi] = value
        truth[:, :, lo:hi] = k
    return image, truth


def _layer(path, data, layer_type):
    size = tuple(reversed(data.shape))
    vol = create_layer(str(path), LayerSpec(layer_type, data.dtype.name, size, (10.0, 10.0, 10.0), OFFSET, CHUNK),
                       Provenance("test"))
    write_box(vol, Box.from_shape(size, OFFSET), data)
    return str(path)


def _read(path):
    return read_box(open_layer(str(path)), Box.from_shape(SIZE, OFFSET))


@pytest.fixture()
def oracle(monkeypatch):
    network = OracleNetwork(FFNConfig(ModelConfig(depth=1, fov_size=(9, 9, 9), deltas=(4, 4, 4), features=1),
                                      InferenceOptions(min_segment_size=10)))
    monkeypatch.setattr(refine, "_network", lambda model, inference: network)
    return network


def _run(stages, root, name):
    return run_stages(stages, RunnerOptions(str(root / f"q_{name}"), str(root / f"rec_{name}"), workers=1, progress=False))


def test_p2_then_p3_over_subvolumes_with_the_oracle(tmp_path, oracle):
    image, truth = _volume()
    p1 = truth.copy()
    z = np.arange(truth.shape[0])[:, None, None]
    p1[(truth == 1) & (z >= 19)] = 40_000_000_007   # region 1 split at z = 19; both pieces span subvolumes
    p1[truth == 3] = 0                               # region 3 unclaimed, spanning subvolumes
    image_layer = _layer(tmp_path / "image", image, "image")
    p1_layer = _layer(tmp_path / "p1", p1, "segmentation")
    grid = RefineGrid((24, 24, 24), (8, 8, 8))
    p2 = ReseedPlan(image_layer, p1_layer, str(tmp_path / "p2"), "oracle", {}, ReseedOptions(min_segment_size=50), grid)
    p3 = AgglomeratePlan(image_layer, str(tmp_path / "p2"), str(tmp_path / "p3"), "oracle", {},
                         ResegmentOptions(radius=(12, 12, 12), analysis_radius=(8, 8, 8), min_contact=5,
                                          min_object_voxels=20),
                         MergeThresholds(), RefineGrid((24, 24, 24), (0, 0, 0)), pairs_per_task=2)
    stages = reseed_stages(p2) + agglomerate_stages(p3, upstream=())
    stages[4] = type(stages[4])(plan=p3, step="pairs", upstream=(stages[3],))
    stages[5:] = agglomerate_stages(p3, upstream=(stages[3],))[1:]
    report = _run(stages, tmp_path, "oracle")
    assert report.results["refine.p2-grow"].tasks == 2 * 2 * 2
    assert report.results["refine.p3-equivalence"].tasks == 1

    after_p2 = _read(tmp_path / "p2")
    claimed = p1 != 0
    assert np.array_equal(after_p2[claimed], p1[claimed]), "P2 changed a claimed voxel"
    region3 = after_p2[truth == 3]
    ids, counts = np.unique(region3, return_counts=True)
    assert ids[np.argmax(counts)] > p1.max() and counts.max() > 0.75 * region3.size  # one new object, new ID
    assert len(np.unique(after_p2[(truth == 3) & (after_p2 > 0)])) == 1, "region 3 was not stitched into one"
    p2_report = read_report(str(tmp_path / "p2"))
    assert p2_report["objects_added"] == 1 and p2_report["voxels_changed"] == int((after_p2 != p1).sum())

    final = _read(tmp_path / "p3")
    assert len(np.unique(final[truth == 1])) == 1, "the two pieces of region 1 were not joined"
    for a, b in ((1, 2), (2, 3)):
        assert not set(np.unique(final[truth == a])) & set(np.unique(final[truth == b])), "two regions were joined"
    p3_report = read_report(str(tmp_path / "p3"))
    assert p3_report["pairs_merged"] == 1 and p3_report["objects_merged"] == 1
    assert p3_report["voxels_changed"] == int((final != after_p2).sum()) == int((p1 == 40_000_000_007).sum())

    # New thresholds rerun only the equivalence and the relabel: no FFN step runs again.
    strict = AgglomeratePlan(**{**p3.__dict__, "thresholds": MergeThresholds(min_iou=1.0, min_cross=1.0)})
    again = _run(reseed_stages(p2)[:4] + _chain(agglomerate_stages(strict), reseed_stages(p2)[3]), tmp_path, "oracle")
    ran = {name for name, r in again.results.items() if r.status == "done"}
    assert ran == {"refine.p3-equivalence", "refine.p3-relabel"}
    assert read_report(str(tmp_path / "p3"))["pairs_merged"] == 0
    assert np.array_equal(_read(tmp_path / "p3"), after_p2)


def _chain(stages, upstream):
    first = type(stages[0])(plan=stages[0].plan, step=stages[0].step, upstream=(upstream,))
    out, previous = [first], first
    for stage in stages[1:]:
        previous = type(stage)(plan=stage.plan, step=stage.step, previous=previous)
        out.append(previous)
    return out


def test_p2_and_p3_with_a_real_network_keep_their_invariants_and_resume(tmp_path):
    from conftest import make_tiny_ffn

    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

    model = make_tiny_ffn(tmp_path / "tiny_ffn")
    image, truth = synthetic_volume(SyntheticSpec(shape=tuple(reversed(SIZE)), neurites=8, seed=5))
    p1 = truth.astype(np.uint64).copy()
    p1[(np.arange(p1.shape[0]) % 11 < 3)[:, None, None] & np.ones_like(p1, bool)] = 0  # slabs left unclaimed
    image_layer = _layer(tmp_path / "image", image, "image")
    p1_layer = _layer(tmp_path / "p1", p1, "segmentation")
    p2 = ReseedPlan(image_layer, p1_layer, str(tmp_path / "p2"), model, {}, ReseedOptions(min_segment_size=20, max_seeds=3),
                    RefineGrid((24, 24, 24), (8, 8, 8)))
    p3 = AgglomeratePlan(image_layer, str(tmp_path / "p2"), str(tmp_path / "p3"), model, {},
                         ResegmentOptions(radius=(6, 6, 6), analysis_radius=(4, 4, 4), min_contact=40),
                         MergeThresholds(min_iou=0.3, min_cross=0.3, min_self=0.3, max_deleted=0.5),
                         RefineGrid((24, 24, 24), (0, 0, 0)), pairs_per_task=8)
    p2_stages = reseed_stages(p2)
    stages = p2_stages + _chain(agglomerate_stages(p3), p2_stages[-1])
    first = _run(stages, tmp_path, "tiny")
    assert all(r.status == "done" for r in first.results.values())
    after_p2, final = _read(tmp_path / "p2"), _read(tmp_path / "p3")
    assert np.array_equal(after_p2[p1 != 0], p1[p1 != 0])
    assert read_report(str(tmp_path / "p2"))["network_evaluations"] > 0
    # P3 only renames: every final object is a union of whole P2 objects, and 0 stays 0.
    assert np.array_equal(final == 0, after_p2 == 0)
    pairs = np.unique(np.stack([after_p2.ravel(), final.ravel()], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs)
    report = read_report(str(tmp_path / "p3"))
    assert report["pairs_resegmented"] > 0
    assert report["objects_merged"] == len(np.unique(after_p2)) - len(np.unique(final))
    assert json.loads((tmp_path / "p3" / "refine.json").read_text()) == report

    # Resuming: a lost evidence file is recomputed, the rest is kept.
    evidence = sorted((tmp_path / "p3.staging" / "p3" / "evidence").glob("*.npy"))
    assert evidence
    kept = evidence[-1].stat().st_mtime_ns
    evidence[0].with_name(evidence[0].name + ".done").unlink()
    from exaconnect.services.refine import ResegmentTask

    ResegmentTask(str(p3.staging), 0, min(8, report["pairs_resegmented"])).execute()
    assert evidence[0].with_name(evidence[0].name + ".done").exists() and evidence[-1].stat().st_mtime_ns == kept
    again = _run(stages, tmp_path, "tiny")
    assert {r.status for r in again.results.values()} == {"skipped"}


def test_the_fill_over_subvolumes_is_the_fill_of_the_whole_volume(tmp_path):
    """Gaps thinner than the overlap are decided as the whole volume's fill decides them, on a
    layer off the origin and off the chunk grid; claimed voxels never change; a rerun skips."""
    from exaconnect.errors import InputError
    from exaconnect.ffn.fill import fill_unsegmented

    image, truth = _volume()
    rng = np.random.default_rng(3)
    p1 = truth.copy()
    x = np.arange(truth.shape[2])
    p1[:, :, (x % 16 == 13) | (x % 16 == 14)] = 0          # a band beside each membrane
    p1[rng.random(p1.shape) < 0.05] = 0                     # scattered holes
    p1[20, 20, 17:26] = 1                                   # a thin arm of region 1 into region 2, across a face
    p1[p1 == 2] = 2**40 + 9                                 # a packed ID, as the segment service writes
    image_layer = _layer(tmp_path / "image", image, "image")
    p1_layer = _layer(tmp_path / "p1", p1, "segmentation")
    plan = FillPlan(image_layer, p1_layer, str(tmp_path / "filled"), sigma=0.0, grid=RefineGrid((16, 16, 16), (8, 8, 8)))
    stages = fill_stages(plan)
    report = _run(stages, tmp_path, "fill")
    assert report.results["refine.fill"].tasks == 3 * 3 * 3

    filled = _read(tmp_path / "filled")
    assert np.array_equal(filled, fill_unsegmented(image, p1, sigma=0.0))
    assert np.array_equal(filled[p1 != 0], p1[p1 != 0]) and not (filled == 0).any()
    assert {int(i) for i in np.unique(filled)} == {1, 2**40 + 9, 3}
    fill_report = read_report(str(tmp_path / "filled"))
    assert fill_report["voxels_changed"] == int((p1 == 0).sum())
    assert fill_report["unclaimed_fraction_before"] == round(float((p1 == 0).mean()), 6)
    assert fill_report["unclaimed_fraction_after"] == 0 and fill_report["network_evaluations"] == 0
    again = _run(fill_stages(plan), tmp_path, "fill")
    assert {r.status for r in again.results.values()} == {"skipped"}

    # Opened as well: the subvolumes' margin (8) covers twice the radius, so again the whole
    # volume's result; an overlap too small for the radius is refused before anything is written.
    from exaconnect.ffn.fill import open_objects

    opened = FillPlan(image_layer, p1_layer, str(tmp_path / "opened"), grid=RefineGrid((16, 16, 16), (8, 8, 8)),
                      open_radius=2)
    _run(fill_stages(opened), tmp_path, "open")
    expected = open_objects(fill_unsegmented(image, p1, sigma=0.0), 2)
    assert np.array_equal(_read(tmp_path / "opened"), expected) and (expected[20, 20, 18:26] == 0).all()
    opened_report = read_report(str(tmp_path / "opened"))
    assert opened_report["voxels_opened"] == int(((p1 != 0) & (expected == 0)).sum())
    assert opened_report["unclaimed_fraction_after"] == round(float((expected == 0).mean()), 6)
    with pytest.raises(InputError, match=r"overlap \(4, 4, 4\) must be at least 6 voxels"):
        FillPlan(image_layer, p1_layer, str(tmp_path / "x"), grid=RefineGrid((16, 16, 16), (4, 4, 4)), open_radius=3)
    assert not (tmp_path / "x").exists()


def test_the_refine_section_plans_p2_and_p3_between_segment_and_meshes(tmp_path):
    from pathlib import Path

    from exaconnect.errors import InputError
    from exaconnect.pipeline import build_plan
    from exaconnect.pipeline_config import load_pipeline
    from exaconnect.services.stages import stage_graph

    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    model = str(tmp_path / "some_ffn")
    base = {"pipeline": {"output": str(tmp_path / "out")}, "source": {"synthetic_shape": [32, 32, 32]},
            "montage": {"enabled": False},
            "segment": {"model": model}}
    off = build_plan(load_pipeline(demo, {**base, "refine": {"enabled": False}}))
    assert not [s for s in off.stages if s.name.startswith("refine.")]
    # The demo turns on the fill alone; here each pass is asked for explicitly.
    passes = {"enabled": True, "p2": {"enabled": True}, "p3": {"enabled": True}, "fill": {"enabled": False}}

    config = load_pipeline(demo, {**base, "refine": {**passes, "p3": {"enabled": True, "min_iou": 0.7}}})
    plan = build_plan(config)
    names = [s.name for s in stage_graph(plan.stages)]
    for earlier, later in [("segment.relabel", "refine.p2-grow"), ("refine.p2-relabel", "refine.p3-pairs"),
                           ("refine.p3-relabel", "pyramid.refined"), ("pyramid.refined", "mesh.forge"),
                           ("pyramid.refined", "evaluate")]:
        assert names.index(earlier) < names.index(later)
    assert plan.layers["segmentation"].endswith("/segmentation_p3")
    p3 = next(s for s in plan.stages if s.name == "refine.p3-pairs")
    assert p3.plan.thresholds.min_iou == 0.7 and p3.plan.input_layer.endswith("/segmentation_p2")
    assert p3.plan.model == model  # the segment section's model, by default
    only_p3 = build_plan(load_pipeline(demo, {**base, "refine": {**passes, "p2": {"enabled": False}}}))
    assert next(s for s in only_p3.stages if s.name == "refine.p3-pairs").plan.input_layer.endswith("/segmentation")
    with pytest.raises(InputError, match="refine.p3.min_iuo"):
        load_pipeline(demo, {**base, "refine": {"p3": {"min_iuo": 0.7}}})

    # The fill comes last, on whatever the passes before it made, and is what gets published.
    filled = build_plan(load_pipeline(demo, {**base, "refine": {**passes, "fill": {"enabled": True}}}))
    names = [s.name for s in stage_graph(filled.stages)]
    for earlier, later in [("refine.p3-relabel", "refine.fill"), ("refine.fill", "refine.fill-report"),
                           ("refine.fill-report", "pyramid.refined")]:
        assert names.index(earlier) < names.index(later)
    fill = next(s for s in filled.stages if s.name == "refine.fill")
    assert fill.plan.input_layer.endswith("/segmentation_p3") and filled.layers["segmentation"].endswith(
        "/segmentation_filled")
    only_fill = build_plan(load_pipeline(demo, {**base, "refine": {"enabled": True, "p2": {"enabled": False},
                                                                   "p3": {"enabled": False}, "fill": {"enabled": True}}}))
    assert not [s for s in only_fill.stages if s.name.startswith("refine.p")]
    assert next(s for s in only_fill.stages if s.name == "refine.fill").plan.input_layer.endswith("/segmentation")


def test_bad_refine_plans_are_refused_before_anything_is_written(tmp_path):
    from exaconnect.errors import InputError

    image, truth = _volume()
    image_layer = _layer(tmp_path / "image", image, "image")
    p1_layer = _layer(tmp_path / "p1", truth, "segmentation")
    with pytest.raises(InputError, match="is the input layer"):
        ReseedPlan(image_layer, p1_layer, p1_layer, "m")
    odd = ReseedPlan(image_layer, p1_layer, str(tmp_path / "p2"), "m", grid=RefineGrid((20, 24, 24), (8, 8, 8)))
    with pytest.raises(InputError, match=r"subvolume \(20, 24, 24\): not a multiple of the chunk size"):
        reseed_stages(odd)[0].make_tasks()
    assert not (tmp_path / "p2").exists()
    with pytest.raises(InputError, match="pairs_per_task"):
        AgglomeratePlan(image_layer, p1_layer, str(tmp_path / "p3"), "m", pairs_per_task=0)
    with pytest.raises(InputError, match=r"fill.sigma=-1: expected a number >= 0"):
        FillPlan(image_layer, p1_layer, str(tmp_path / "filled"), sigma=-1)
