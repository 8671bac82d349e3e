"""Downsample, mesh and skeletonize through the stage runner (real queues and workers) on the
synthetic sample, and the whole demo through its CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from exaconnect.precomputed.layers import layer_url, open_layer, read_box, layer_bounds
from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume
from exaconnect.services.downsample import create_downsample_tasks
from exaconnect.services.ingest import IngestOptions, ingest_now
from exaconnect.services.mesh import create_mesh_forge_tasks, create_mesh_merge_tasks
from exaconnect.services.queue import queue_status
from exaconnect.services.runner import RunnerOptions, run_stages
from exaconnect.services.skeleton import create_skeleton_forge_tasks, create_skeleton_merge_tasks
from runner_tasks import task_stage


def run(root, name, service, tasks):
    """One stage through the runner with an in-process worker; its queue is ROOT/q/SERVICE."""
    tasks = list(tasks)
    report = run_stages([task_stage(name, service, lambda: tasks)],
                        RunnerOptions(str(root / "q"), str(root / "records"), workers=1, progress=False))
    assert report.results[name].tasks == len(tasks)
    status = queue_status(str(root / "q" / service))
    assert status.enqueued == 0 and status.failed == 0


@pytest.fixture(scope="module")
def sample_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    image, labels = synthetic_volume(SyntheticSpec(shape=(64, 64, 64), seed=3))
    np.save(root / "image.npy", image)
    np.save(root / "labels.npy", labels)
    ingest_now(str(root / "image.npy"), str(root / "image"), IngestOptions("image", (10, 10, 10), chunk_size=(16, 16, 16)), progress=False)
    ingest_now(str(root / "labels.npy"), str(root / "labels"), IngestOptions("segmentation", (10, 10, 10), chunk_size=(16, 16, 16)), progress=False)
    return root, image, labels


def test_downsample_mean_for_images_and_mode_for_labels(sample_layers):
    root, image, labels = sample_layers
    run(root, "pyramids", "downsample", list(create_downsample_tasks(str(root / "image"), num_mips=2)) +
        list(create_downsample_tasks(str(root / "labels"), num_mips=2)))
    img1 = read_box(open_layer(str(root / "image"), mip=1), layer_bounds(open_layer(str(root / "image"), mip=1)).__class__((0, 0, 0), (32, 32, 32)))
    expected = image.reshape(32, 2, 32, 2, 32, 2).astype(float).mean(axis=(1, 3, 5))
    assert np.abs(img1.astype(float) - expected).max() <= 1.0  # averaging, rounded
    lab_vol = open_layer(str(root / "labels"), mip=2)
    assert lab_vol.info["scales"][2]["size"] == [16, 16, 16]
    lab2 = np.asarray(lab_vol[:, :, :])[..., 0].transpose(2, 1, 0)
    assert set(np.unique(lab2)) <= set(np.unique(labels))  # mode: never invents labels


def test_meshes_and_skeletons_load_for_every_object(sample_layers):
    root, image, labels = sample_layers
    url = layer_url(str(root / "labels"))
    run(root, "mesh.forge", "mesh", create_mesh_forge_tasks(url, shape=(32, 32, 32)))
    # Workers leave a box per task for the viewer's live task layer.
    from exaconnect.viewer.tasks import read_task_states

    states = read_task_states(f"{root}/q/mesh/boxes")
    assert len(states.tasks) == 8 and {t.state for t in states.tasks} == {"done"}
    assert sorted(t.bbox for t in states.tasks)[0][:3] == (0, 0, 0)
    run(root, "mesh.merge", "mesh", create_mesh_merge_tasks(url))
    vol = open_layer(url)
    ids = [int(i) for i in np.unique(labels) if i]
    meshes = vol.mesh.get(ids, fuse=False)
    assert sorted(meshes) == ids and all(len(m.faces) > 0 for m in meshes.values())
    # A mesh spans the object it came from: its bounding box matches the label's (nm, +- a voxel).
    biggest = max(ids, key=lambda i: (labels == i).sum())
    zyx = np.argwhere(labels == biggest)
    vmin, vmax = meshes[biggest].vertices.min(0), meshes[biggest].vertices.max(0)
    assert np.allclose(vmin, zyx.min(0)[::-1] * 10, atol=15) and np.allclose(vmax, zyx.max(0)[::-1] * 10, atol=15)

    run(root, "skeleton.forge", "skeleton", create_skeleton_forge_tasks(url, shape=(32, 32, 32), dust_threshold=100))
    run(root, "skeleton.merge", "skeleton", create_skeleton_merge_tasks(url))
    skeleton = open_layer(url).skeleton.get(biggest)  # reopened: the info now names the skeleton dir
    assert len(skeleton.vertices) > 10 and len(skeleton.edges) > 10
    # Skeleton vertices lie inside their object.
    voxels = np.round(skeleton.vertices / 10).astype(int)
    voxels = np.clip(voxels, 0, 63)
    inside = labels[voxels[:, 2], voxels[:, 1], voxels[:, 0]] == biggest
    assert inside.mean() > 0.9


def _entropy_bits(labels):
    _, sizes = np.unique(labels[labels > 0], return_counts=True)
    p = sizes / sizes.sum()
    return float(-(p * np.log2(p)).sum())


def test_baselines_empty_scores_the_truths_entropy_and_a_watershed_beats_it():
    from exaconnect.precomputed.baselines import WatershedParameters, baseline_scores, watershed_segmentation
    from exaconnect.precomputed.evaluate import segmentation_metrics

    image, labels = synthetic_volume(SyntheticSpec(shape=(40, 56, 48), seed=5))
    scores = baseline_scores(image, labels, segmentation_metrics)
    empty, watershed = scores["empty"], scores["watershed"]
    assert empty["segments"] == 1 and empty["vi_split"] == 0 and abs(empty["vi"] - _entropy_bits(labels)) < 1e-9
    assert watershed["vi"] < empty["vi"] and watershed["adapted_rand_error"] < empty["adapted_rand_error"]
    segmented = watershed_segmentation(image, WatershedParameters())
    assert segmented.shape == labels.shape and segmented.all()  # dense, like the ground truth
    assert watershed["parameters"] == WatershedParameters().to_dict()
    # A featureless image has nothing to flood from: one segment, not an error.
    assert np.unique(watershed_segmentation(np.full((20, 20, 20), 7, np.uint8))).tolist() == [0]
    assert list(baseline_scores(None, labels, segmentation_metrics)) == ["empty"]


def test_evaluate_reports_baselines_on_the_scored_box_off_the_origin(sample_layers, tmp_path, capsys):
    from exaconnect.errors import InputError
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.baselines import WatershedParameters, watershed_segmentation
    from exaconnect.precomputed.evaluate import segmentation_metrics
    from exaconnect.precomputed.evaluate_report import evaluate
    from exaconnect.services.evaluate import EvaluateStage

    root, image, labels = sample_layers
    box = Box((5, 9, 3), (50, 47, 61))  # x, y, z; off the origin and the 16^3 chunk grid
    crop = (slice(3, 61), slice(9, 47), slice(5, 50))
    metrics = evaluate(str(root / "labels"), str(root / "labels"), box, str(tmp_path / "scores.json"),
                       image_spec=str(root / "image"), watershed=WatershedParameters(min_distance=8))
    assert metrics["vi"] == 0
    empty, watershed = metrics["baselines"]["empty"], metrics["baselines"]["watershed"]
    assert abs(empty["vi"] - _entropy_bits(labels[crop])) < 1e-9
    expected = segmentation_metrics(watershed_segmentation(image[crop], WatershedParameters(min_distance=8)), labels[crop])
    assert watershed["vi"] == expected["vi"] and watershed["parameters"]["min_distance"] == 8
    assert json.loads((tmp_path / "scores.json").read_text())["baselines"]["watershed"]["vi"] == watershed["vi"]
    # The same box of a .npy image gives the same baselines.
    np.save(tmp_path / "image.npy", image)
    again = evaluate(str(root / "labels"), str(root / "labels"), box, image_spec=str(tmp_path / "image.npy"),
                     watershed=WatershedParameters(min_distance=8))
    assert again["baselines"]["watershed"]["vi"] == watershed["vi"]
    # The command line: `exaconnect evaluate --image` prints the baselines beside the scores.
    from exaconnect.cli import main

    np.save(tmp_path / "empty.npy", np.zeros_like(labels))
    assert main(["evaluate", str(tmp_path / "empty.npy"), str(root / "labels"), "--bbox", "5,9,3,50,47,61",
                 "--image", str(tmp_path / "image.npy"), "--include-groundtruth-zero"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vi"] == printed["baselines"]["empty"]["vi"] and "watershed" in printed["baselines"]
    with pytest.raises(InputError, match="min_distance"):
        EvaluateStage(segmentation="a", groundtruth="b", store="c", image="d", watershed={"min_distance": 0})
    with pytest.raises(InputError, match="unknown"):
        EvaluateStage(segmentation="a", groundtruth="b", store="c", image="d", watershed={"radius": 3})


def test_committed_demo_model_is_checked_installed_and_used_unless_steps_are_asked_for(tmp_path):
    import shutil

    from exaconnect.errors import InputError
    from exaconnect.ffn import load_model
    from exaconnect.ffn.training.demo import committed_demo_model, install_demo_model
    from exaconnect.pipeline import build_plan, default_pipeline_file
    from exaconnect.pipeline_config import load_pipeline

    directory, digest = committed_demo_model()
    installed = install_demo_model(tmp_path / "ffn")
    assert installed.name == f"demo-model-{digest[:12]}" and committed_demo_model(installed)[1] == digest
    assert install_demo_model(tmp_path / "ffn") == installed  # made once
    predictor = load_model(installed, device="cpu")
    assert predictor.model_config.fov_size == (17, 17, 17) and predictor.model_config.features == 16
    # A changed weights file is refused by name, not segmented with.
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    with open(broken / "ckpt.data-00000-of-00001", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(InputError, match="ckpt.data-00000-of-00001"):
        committed_demo_model(broken)

    def plan(**segment):
        sets = {"pipeline": {"output": str(tmp_path / "out"), "queue_root": str(tmp_path / "q")}, "segment": segment}
        return build_plan(load_pipeline(default_pipeline_file(), sets))

    stages = plan().stages
    assert not [s for s in stages if s.name == "train.demo-model"]
    segment = next(s for s in stages if s.name == "segment.initial")
    assert str(tmp_path / "out" / "ffn" / f"demo-model-{digest[:12]}") in json.dumps(segment.parameters())
    assert [s.name for s in plan(demo_model_steps=50).stages].count("train.demo-model") == 1


def test_demo_runs_end_to_end_reuses_its_stages_and_scores_within_bounds(tmp_path):
    """`make demo` is `exaconnect run configs/demo.yaml`: ingest, misalign and align, the demo FFN
    kept in the repository (nothing trained), segment, stitch, mesh, skeletons, evaluate beside
    two baselines, link. A second run reuses every stage."""
    command = [sys.executable, "-m", "exaconnect.cli", "demo", "--output", str(tmp_path / "data"),
               "--queue-root", str(tmp_path / "queues")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "#!" in lines[-1] and "/states/" in lines[-1]  # the short link to the saved state
    assert any(line.startswith("[run] alignment: neighbour correlation") for line in lines)
    # The sample is cut into tiles and stitched back first (montage), every tile placed.
    assert any(line.startswith("[run] montage: 384/384 tiles placed in 96 sections") for line in lines), lines[-30:]
    summary = json.loads((tmp_path / "data" / "pipeline" / "summary.json").read_text())
    stages = summary["stages"]
    for name in ("montage.match", "montage.render", "montage.outlines", "ingest.groundtruth", "misalign", "align.flow",
                 "align.render", "align.report",
                 "segment.initial", "segment.faces", "segment.equivalence", "segment.relabel", "refine.fill",
                 "mesh.merge", "skeleton.merge", "evaluate"):
        assert stages[name]["status"] == "done", name
    assert "train.demo-model" not in stages  # the committed model: the demo trains nothing
    # The blank section is found and bridged; alignment raises neighbour correlation.
    alignment = summary["alignment"]
    assert "40" in alignment["problem_sections"]
    assert alignment["mean_correlation_after"] > alignment["mean_correlation_before"] + 0.2
    scores = summary["scores"]
    assert scores["vi"] < DEMO_VI_BOUND and scores["adapted_rand_error"] < DEMO_ARE_BOUND, scores
    # The baselines are scored on the same box: the empty segmentation's VI is all merge, the
    # ground truth's entropy, recomputed here from the aligned ground truth itself.
    baselines = scores["baselines"]
    truth = read_box(open_layer(summary["layers"]["groundtruth"]), layer_bounds(open_layer(summary["layers"]["groundtruth"])))
    _, sizes = np.unique(truth[truth > 0], return_counts=True)
    p = sizes / sizes.sum()
    assert baselines["empty"]["vi_split"] == 0 and abs(baselines["empty"]["vi"] - float(-(p * np.log2(p)).sum())) < 1e-9
    assert DEMO_VI_BOUND < baselines["empty"]["vi"] and DEMO_ARE_BOUND < baselines["empty"]["adapted_rand_error"]
    assert baselines["watershed"]["segments"] > 1 and "parameters" in baselines["watershed"]
    # Filled, the FFN's segmentation beats the watershed too (a baseline with no network in it,
    # so the same figure on every CPU).
    assert scores["vi"] < baselines["watershed"]["vi"], (scores, baselines["watershed"])
    assert scores["adapted_rand_error"] < baselines["watershed"]["adapted_rand_error"], (scores, baselines["watershed"])
    assert summary["layers"]["segmentation"].endswith("/segmentation_filled")
    for key in ("empty segmentation (one segment)", "watershed of the image"):
        assert any(line.startswith(f"[run] baseline, {key}: VI ") for line in lines), key
    # A network that learned nothing leaves the volume unsegmented (one segment, label 0).
    assert scores["segments"] >= scores["groundtruth_objects"], scores
    # Meshes and skeletons of the FFN segmentation load.
    seg = open_layer(summary["layers"]["segmentation"])
    ids = [int(i) for i in np.unique(read_box(seg, layer_bounds(seg))) if i][:3]
    assert all(len(m.faces) for m in seg.mesh.get(ids, fuse=False).values())

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "data" / "pipeline" / "summary.json").read_text())
    assert {s["status"] for s in summary["stages"].values()} == {"skipped"}
    assert "VI" in again.stdout and "#!" in again.stdout.strip().splitlines()[-1]


# The demo segments with the model kept in the repository (ffn/demo_model), so every CPU runs the
# same weights; only the rounding of inference differs between oneDNN's kernel paths (the same
# segmentation on four paths of one Xeon, docs/segment.md, "The demo's model and its score").
# Filled, it scores VI 1.604 / adapted Rand error 0.394 here; an empty segmentation of the same
# volume 3.018 / 0.703 and the watershed 2.012 / 0.488. The bounds (the measured score plus a
# margin for other CPUs) sit below both baselines: a demo that does not beat them fails.
DEMO_VI_BOUND = 1.9
DEMO_ARE_BOUND = 0.46
