"""`exaconnect segment box` with the published FIB-25 checkpoint reproduces the reference 64^3 crop."""

import json

import numpy as np
import pytest

from exaconnect.cli import main
from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.evaluate import contingency_table, variation_of_information
from exaconnect.precomputed.layers import open_layer, read_box


def test_segment_cli_reproduces_reference_crop64(tmp_path, shared_dir, capsys):
    fib = shared_dir / "data/fib25/training_sample2"
    assert main(["ingest", "run", str(fib / "grayscale_maps"), str(tmp_path / "image"), "--resolution", "10,10,10"]) == 0
    model = shared_dir / "models/ffn-fib25/model.ckpt-27465036"
    code = main(["segment", "box", str(tmp_path / "image"), str(tmp_path / "seg"), "--model", str(model),
                 "--bbox", "0,0,0,64,64,64", "--counters", str(tmp_path / "counters.json")])
    assert code == 0, capsys.readouterr().err
    ours = read_box(open_layer(str(tmp_path / "seg")), Box((0, 0, 0), (64, 64, 64)))
    reference = np.load(shared_dir / "reference/fib25/training_sample2_crop64_ffn_segmentation.npz")["segmentation"]
    split, merge = variation_of_information(contingency_table(ours, reference, ignore_groundtruth_zero=False))
    assert split + merge < 0.05
    counters = json.loads((tmp_path / "counters.json").read_text())["counters"]
    assert abs(counters["network-evaluations"] - 42) <= 4
    # Outside the box the layer stays empty (unwritten chunks read as 0).
    assert not read_box(open_layer(str(tmp_path / "seg"), fill_missing=True), Box((64, 0, 0), (128, 64, 64))).any()


def test_segment_cli_rejects_a_box_outside_the_layer(tmp_path, shared_dir, capsys):
    np.save(tmp_path / "img.npy", np.zeros((40, 40, 40), np.uint8))
    assert main(["ingest", "run", str(tmp_path / "img.npy"), str(tmp_path / "image"), "--resolution", "10,10,10"]) == 0
    code = main(["segment", "box", str(tmp_path / "image"), str(tmp_path / "seg"), "--model", "unused",
                 "--bbox", "0,0,0,64,64,64"])
    assert code == 2 and "outside the layer bounds" in capsys.readouterr().err
    assert not (tmp_path / "seg").exists()


def test_segment_cli_fill_unsegmented_gives_a_dense_layer(tmp_path, shared_dir, capsys):
    """--fill-unsegmented keeps every FFN voxel and hands the crop's 51 % of gaps to objects."""
    fib = shared_dir / "data/fib25/training_sample2"
    assert main(["ingest", "run", str(fib / "grayscale_maps"), str(tmp_path / "image"), "--resolution", "10,10,10"]) == 0
    model = shared_dir / "models/ffn-fib25/model.ckpt-27465036"
    code = main(["segment", "box", str(tmp_path / "image"), str(tmp_path / "seg"), "--model", str(model),
                 "--bbox", "0,0,0,64,64,64", "--fill-unsegmented", "--counters", str(tmp_path / "counters.json")])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "counters.json").read_text())
    assert summary["filled"] and 0.4 < summary["unsegmented_fraction"] < 0.6
    ours = read_box(open_layer(str(tmp_path / "seg")), Box((0, 0, 0), (64, 64, 64)))
    reference = np.load(shared_dir / "reference/fib25/training_sample2_crop64_ffn_segmentation.npz")["segmentation"]
    assert not (ours == 0).any()
    assert len(np.unique(ours)) == len(np.unique(reference)) - 1  # no new objects, only "0" gone
    labelled = reference > 0
    split, merge = variation_of_information(
        contingency_table(ours[labelled], reference[labelled], ignore_groundtruth_zero=False))
    assert split + merge < 0.05
