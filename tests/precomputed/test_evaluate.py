import json

import numpy as np
import pytest

from exaconnect.precomputed.evaluate import segmentation_metrics


def two_bodies():
    gt = np.zeros((8, 16, 16), dtype=np.uint32)
    gt[:, :, :8] = 1
    gt[:, :, 8:] = 2
    return gt


def test_identical_scores_zero():
    gt = two_bodies()
    m = segmentation_metrics(gt * 7, gt)
    assert m["vi"] == pytest.approx(0) and m["adapted_rand_error"] == pytest.approx(0)
    assert m["split_objects"] == 0 and m["merged_objects"] == 0


def test_one_split_is_one_bit_of_split_on_half_the_voxels():
    gt = two_bodies()
    seg = gt.copy()
    seg[:4][seg[:4] == 1] = 3  # body 1 cut in two equal halves along z
    m = segmentation_metrics(seg, gt)
    assert m["vi_split"] == pytest.approx(0.5)  # half the voxels carry 1 bit
    assert m["vi_merge"] == pytest.approx(0)
    assert m["split_objects"] == 1 and m["merged_objects"] == 0
    assert m["adapted_rand_error"] > 0


def test_one_merge():
    gt = two_bodies()
    m = segmentation_metrics(np.ones_like(gt), gt)
    assert m["vi_merge"] == pytest.approx(1.0) and m["vi_split"] == pytest.approx(0)
    assert m["merged_objects"] == 1 and m["split_objects"] == 0


def test_agrees_with_scikit_image():
    from skimage.metrics import adapted_rand_error, variation_of_information

    rng = np.random.default_rng(1)
    gt = rng.integers(1, 6, (10, 10, 10))
    seg = (gt + (rng.random(gt.shape) < 0.2)) % 7
    m = segmentation_metrics(seg, gt)
    split, merge = variation_of_information(gt, seg)  # skimage: (H(seg|gt), H(gt|seg))
    assert m["vi_split"] == pytest.approx(split) and m["vi_merge"] == pytest.approx(merge)
    assert m["adapted_rand_error"] == pytest.approx(adapted_rand_error(gt, seg)[0], abs=1e-6)


def test_reference_ffn_scores_on_fib25(shared_dir, fib25_groundtruth):
    ref = np.load(shared_dir / "reference/fib25/training_sample2_ffn_segmentation.npz")["segmentation"]
    m = segmentation_metrics(ref, fib25_groundtruth, ignore_segmentation_zero=True)
    # The figures ../shared/README.md gives for the reference run.
    assert m["vi"] == pytest.approx(0.876, abs=5e-4)
    assert m["vi_split"] == pytest.approx(0.613, abs=5e-4)
    assert m["vi_merge"] == pytest.approx(0.263, abs=5e-4)
    assert m["adapted_rand_error"] == pytest.approx(0.056, abs=5e-4)


def test_evaluate_cli_writes_json_and_png(tmp_path, shared_dir):
    from exaconnect.cli import main

    ref = shared_dir / "reference/fib25/training_sample2_crop64_ffn_segmentation.npz"
    gt = shared_dir / "data/fib25/training_sample2/groundtruth.h5:stack"
    out = tmp_path / "eval.json"
    # The crop is 64^3, so a 100^3 box lies outside it: a clear error, nothing written.
    assert main(["evaluate", str(ref), str(gt), "--bbox", "0,0,0,100,100,100", "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["evaluate", str(shared_dir / "reference/fib25/training_sample2_ffn_segmentation.npz"), str(gt),
                 "--bbox", "0,0,0,64,64,64", "--out", str(out), "--ignore-segmentation-zero"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["vi"] > 0 and out.with_suffix(".png").stat().st_size > 1000


def test_evaluate_cli_on_precomputed_layers(tmp_path, capsys):
    from exaconnect.cli import main

    gt = np.zeros((16, 32, 32), dtype=np.uint32)
    gt[:, :, :16], gt[:, :, 16:] = 1, 2
    seg = gt.copy()
    seg[:8][seg[:8] == 1] = 5  # one split
    for name, array in (("gt", gt), ("seg", seg)):
        np.save(tmp_path / f"{name}.npy", array)
        assert main(["ingest", "run", str(tmp_path / f"{name}.npy"), str(tmp_path / name), "--resolution", "8,8,8",
                     "--type", "segmentation", "--chunk-size", "16,16,16"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "seg"), str(tmp_path / "gt")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["vi_split"] == pytest.approx(0.5) and metrics["vi_merge"] == pytest.approx(0)
    assert metrics["split_objects"] == 1
    assert main(["evaluate", str(tmp_path / "seg"), str(tmp_path / "gt"), "--bbox", "0,0,0,32,32,8"]) == 0
    assert json.loads(capsys.readouterr().out)["vi"] == pytest.approx(0)  # the split is above z=8


def test_reference_scores_with_label_zero_as_one_segment(shared_dir, fib25_groundtruth):
    """Issue 25's figures: the reference's unsegmented voxels counted as one segment. They match
    the default, which leaves out the ground truth's 250 body-less voxels; scoring those too
    (as one more body) moves the merge term by 2e-4."""
    ref = np.load(shared_dir / "reference/fib25/training_sample2_ffn_segmentation.npz")["segmentation"]
    m = segmentation_metrics(ref, fib25_groundtruth)
    assert m["vi"] == pytest.approx(1.817, abs=5e-4)
    assert m["vi_split"] == pytest.approx(0.899, abs=5e-4) and m["vi_merge"] == pytest.approx(0.918, abs=5e-4)
    assert m["adapted_rand_error"] == pytest.approx(0.157, abs=5e-4)
    every = segmentation_metrics(ref, fib25_groundtruth, ignore_groundtruth_zero=False)
    assert every["voxels_scored"] == ref.size == m["voxels_scored"] + 250
    assert every["vi_merge"] == pytest.approx(0.9186, abs=5e-5) and every["vi"] == pytest.approx(1.817, abs=5e-4)


def test_evaluate_cli_skeleton_layer_off_the_origin(tmp_path, capsys):
    """The hand-computed case of test_skeleton_metrics (ERL 7.5 nm) through `exaconnect evaluate`
    with precomputed layers whose voxel offset is not the origin."""
    from test_skeleton_metrics import OFFSET, RESOLUTION, hand_case, write_skeleton_layer

    from exaconnect.cli import main

    skeletons, seg = hand_case()
    truth = np.zeros_like(seg)
    truth[:, 1, :6], truth[:, 3, :5], truth[:, 5, :4] = 11, 12, 13
    write_skeleton_layer(tmp_path / "gt", truth, skeletons, RESOLUTION, OFFSET)
    write_skeleton_layer(tmp_path / "seg", seg, {}, RESOLUTION, OFFSET)
    out = tmp_path / "scores.json"
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "seg"), str(tmp_path / "gt"), "--skeletons", str(tmp_path / "gt"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    metrics = json.loads(out.read_text())
    assert json.loads(printed.out) == metrics and "ERL" in printed.err
    assert metrics["erl"] == pytest.approx(7.5) and metrics["erl_max"] == pytest.approx(5000 / 120)
    assert metrics["skeleton_merging_segments"] == 1 and metrics["skeleton_split_edges"] == 2
    assert metrics["skeleton_omitted_fraction"] == pytest.approx(1 / 6)
    assert metrics["skeleton_source"]["layer"].endswith("gt") and metrics["vi"] > 0
    # The lenient rule (K=3) clears segment 2's merge: 1400/120 nm.
    assert main(["evaluate", str(tmp_path / "seg"), str(tmp_path / "gt"), "--skeletons", str(tmp_path / "gt"),
                 "--merge-min-nodes", "3"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["erl"] == pytest.approx(1400 / 120) and metrics["skeleton_merge_min_nodes"] == 3
    # A box that keeps x >= 3 of the box scores only the pieces inside it.
    x0, y0, z0 = OFFSET
    box = f"{x0 + 3},{y0},{z0},{x0 + 9},{y0 + 7},{z0 + 3}"
    assert main(["evaluate", str(tmp_path / "seg"), str(tmp_path / "gt"), "--skeletons", str(tmp_path / "gt"),
                 "--bbox", box]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["erl"] == pytest.approx(500 / 30) and metrics["skeleton_edges_outside"] == 9
    # Skeletons of a layer at another voxel size are refused by name.
    write_skeleton_layer(tmp_path / "gt20", truth, skeletons, (20, 6, 40), OFFSET)
    assert main(["evaluate", str(tmp_path / "seg"), str(tmp_path / "gt"), "--skeletons", str(tmp_path / "gt20")]) == 2
    assert "resolution" in capsys.readouterr().err


def test_evaluate_cli_skeletonizes_groundtruth_files(tmp_path, capsys):
    from test_skeleton_metrics import tubes

    from exaconnect.cli import main

    labels = tubes()
    np.save(tmp_path / "gt.npy", labels)
    np.save(tmp_path / "joined.npy", (labels > 0).astype(np.uint32))
    out = tmp_path / "scores.json"
    args = ["evaluate", str(tmp_path / "joined.npy"), str(tmp_path / "gt.npy"), "--skeletonize-groundtruth",
            "--kimimaro-const", "30", "--kimimaro-dust-threshold", "20", "--out", str(out)]
    # Files carry no voxel size: a clear error, nothing written.
    assert main(args) == 2
    assert "--resolution" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--resolution", "8,8,30", "--bbox", "1,1,1,27,23,19"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["skeleton_source"]["kimimaro"] == {**metrics["skeleton_source"]["kimimaro"], "scale": 1.5,
                                                      "const": 30.0, "dust_threshold": 20,
                                                      "anisotropy": [8.0, 8.0, 30.0]}
    assert metrics["skeleton_count"] == 2 and metrics["skeleton_merging_segments"] == 1 and metrics["erl"] == 0
    assert main(["evaluate", str(tmp_path / "gt.npy"), str(tmp_path / "gt.npy"), "--merge-min-nodes", "2"]) == 2
    assert "--merge-min-nodes needs" in capsys.readouterr().err


def test_evaluate_task_carries_skeleton_options(tmp_path):
    """The queue task serializes its skeleton options and stores the skeleton scores with the rest."""
    from taskqueue.registered_task import deserialize
    from test_skeleton_metrics import tubes

    from exaconnect.precomputed.layers import layer_url
    from exaconnect.precomputed.store import ArtifactStore
    from exaconnect.services.evaluate import EvaluateTask

    labels = tubes()
    np.save(tmp_path / "gt.npy", labels)
    split = labels.copy()
    split[:, :, 14:][split[:, :, 14:] == 9] = 4  # body 9 cut across its length
    np.save(tmp_path / "split.npy", split)
    store = layer_url(str(tmp_path / "store"))
    task = EvaluateTask(str(tmp_path / "split.npy"), str(tmp_path / "gt.npy"), store, "evaluate/s.json",
                        kimimaro={"const": 30, "dust_threshold": 20}, merge_min_nodes=2, resolution=[8, 8, 30])
    task = deserialize(task.payload())
    task.execute()
    scores = ArtifactStore(store).get_json("evaluate/s.json")
    assert scores["skeleton_split_edges"] >= 1 and scores["skeleton_merging_segments"] == 0
    assert 0 < scores["erl"] < scores["erl_max"] and scores["skeleton_merge_min_nodes"] == 2
    assert scores["skeleton_source"]["kimimaro"]["anisotropy"] == [8.0, 8.0, 30.0]
