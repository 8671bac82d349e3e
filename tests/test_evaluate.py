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
