"""Ingest through the real queue and real worker processes, checked voxel for voxel."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from exaconnect.cli import main
from exaconnect.precomputed.layers import open_layer, read_box, layer_bounds

EXA = [sys.executable, "-m", "exaconnect.cli"]


def read_layer(path) -> np.ndarray:
    vol = open_layer(str(path))
    return read_box(vol, layer_bounds(vol))


def test_fib25_sections_and_groundtruth_through_queue_with_two_workers(tmp_path, monkeypatch, shared_dir, fib25_image,
                                                                       fib25_groundtruth):
    """Relative SRC and layer paths on the command line; workers started in another directory
    (as a pod or a PBS job is) still find both, because payloads carry absolute names."""
    fib = shared_dir / "data/fib25/training_sample2"
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    sections = os.path.relpath(fib / "grayscale_maps", work)
    groundtruth = os.path.relpath(fib / "groundtruth.h5", work) + ":stack"
    assert main(["ingest", "enqueue", sections, "image", "--resolution", "10,10,10", "--queue", "queues"]) == 0
    assert main(["ingest", "enqueue", groundtruth, "gt", "--resolution", "10,10,10", "--type", "segmentation",
                 "--queue", "queues"]) == 0
    queue = str(work / "queues" / "ingest")
    # 250 sections in 64-deep slabs -> 4 tasks per layer.
    done = subprocess.run(EXA + ["queue", "work", queue, "--processes", "2", "--exit-when-empty", "--lease-seconds", "120"],
                          capture_output=True, text=True, timeout=600, cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(read_layer(work / "image"), fib25_image)
    np.testing.assert_array_equal(read_layer(work / "gt"), fib25_groundtruth)
    status = subprocess.run(EXA + ["queue", "status", queue], capture_output=True, text=True)
    counts = json.loads(status.stdout.strip().splitlines()[-1])
    assert (counts["completed"], counts["enqueued"], counts["failed"]) == (8, 0, 0), counts
    from exaconnect.precomputed.verify import verify_layer

    assert verify_layer(str(work / "gt"))["ok"] and verify_layer(str(work / "image"))["ok"]


def test_tiff_and_npy_sources(tmp_path):
    import tifffile

    rng = np.random.default_rng(3)
    stack = rng.integers(0, 65535, (10, 20, 30)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    np.save(tmp_path / "stack.npy", stack)
    (tmp_path / "sections").mkdir()
    for z in range(stack.shape[0]):
        tifffile.imwrite(tmp_path / "sections" / f"s{z:03d}.tif", stack[z])
    for name in ("stack.tif", "stack.npy", "sections"):
        assert main(["ingest", "run", str(tmp_path / name), str(tmp_path / f"out-{name}"), "--resolution", "4,4,40",
                     "--chunk-size", "16,16,4"]) == 0
        np.testing.assert_array_equal(read_layer(tmp_path / f"out-{name}"), stack)


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("sizes", "expected all sections the same size"),
    ("dtype", "image layers take"),
    ("float_labels", "labels must be integers"),
    ("negative_labels", "negative labels"),
    ("resolution", "--resolution"),
    ("h5_dataset", "has no dataset"),
])
def test_bad_input_gives_one_clear_line_and_writes_nothing(tmp_path, capsys, case, message):
    import h5py
    import imageio.v3 as iio

    src = tmp_path / "src"
    args_extra = []
    resolution = "10,10,10"
    if case == "missing":
        src = tmp_path / "nope"
    elif case == "sizes":
        src.mkdir()
        iio.imwrite(src / "a.png", np.zeros((8, 8), np.uint8))
        iio.imwrite(src / "b.png", np.zeros((8, 9), np.uint8))
    elif case == "dtype":
        src = tmp_path / "x.npy"
        np.save(src, np.zeros((4, 4, 4), np.int64))
    elif case == "float_labels":
        src = tmp_path / "x.npy"
        np.save(src, np.zeros((4, 4, 4), np.float32))
        args_extra = ["--type", "segmentation"]
    elif case == "negative_labels":
        src = tmp_path / "x.npy"
        np.save(src, -np.ones((4, 4, 4), np.int32))
        args_extra = ["--type", "segmentation"]
    elif case == "resolution":
        src = tmp_path / "x.npy"
        np.save(src, np.zeros((4, 4, 4), np.uint8))
        resolution = "10,10"
    elif case == "h5_dataset":
        with h5py.File(tmp_path / "x.h5", "w") as f:
            f["stack"] = np.zeros((4, 4, 4), np.uint8)
        src = f"{tmp_path}/x.h5:other"
    code = main(["ingest", "run", str(src), str(tmp_path / "layer"), "--resolution", resolution, *args_extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "layer").exists()
