"""Shared fixtures. Viewer fixtures are named `viewer_*`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

VIEWER_SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VIEWER_FIB25 = VIEWER_SHARED / "data" / "fib25" / "training_sample2"
# 128^3 keeps meshing to a few seconds while holding ~90 bodies, enough for colourful panels.
VIEWER_CROP = 128


@dataclass(frozen=True)
class ViewerLayers:
    root: Path
    image: Path  # uint8 EM, gzip-compressed chunks
    segmentation: Path  # uint32 ground truth with legacy meshes
    image_zyx: np.ndarray
    segmentation_zyx: np.ndarray


def _write_layer(path: Path, data_zyx: np.ndarray, layer_type: str) -> None:
    from cloudvolume import CloudVolume

    size = list(reversed(data_zyx.shape))
    info = CloudVolume.create_new_info(
        num_channels=1,
        layer_type=layer_type,
        data_type=data_zyx.dtype.name,
        encoding="raw",
        resolution=[10, 10, 10],
        voxel_offset=[0, 0, 0],
        volume_size=size,
        chunk_size=[64, 64, 64],
    )
    vol = CloudVolume(f"file://{path}", info=info, compress=True, progress=False)
    vol.commit_info()
    # precomputed arrays are [x, y, z]; the FIB-25 files are [z, y, x].
    vol[:, :, :] = np.ascontiguousarray(data_zyx.transpose(2, 1, 0))


@pytest.fixture(scope="session")
def viewer_fib25_layers(tmp_path_factory: pytest.TempPathFactory) -> ViewerLayers:
    """A 128^3 crop of FIB-25 training_sample2 as an image layer and a meshed segmentation layer."""
    if not VIEWER_FIB25.is_dir():
        pytest.skip(f"FIB-25 sample not found at {VIEWER_FIB25} (the shared data folder is absent in a fresh clone)")
    import h5py
    import igneous.task_creation as tc
    import imageio.v3 as iio
    from taskqueue import LocalTaskQueue

    n = VIEWER_CROP
    pngs = sorted((VIEWER_FIB25 / "grayscale_maps").glob("*.png"))[:n]
    image = np.stack([iio.imread(p)[:n, :n] for p in pngs]).astype(np.uint8)
    with h5py.File(VIEWER_FIB25 / "groundtruth.h5", "r") as f:
        segmentation = np.asarray(f["stack"][:n, :n, :n], dtype=np.uint32)

    root = tmp_path_factory.mktemp("viewer_layers")
    image_path, segmentation_path = root / "fib25_image", root / "fib25_groundtruth"
    _write_layer(image_path, image, "image")
    _write_layer(segmentation_path, segmentation, "segmentation")

    queue = LocalTaskQueue(parallel=1, progress=False)
    queue.insert(tc.create_meshing_tasks(f"file://{segmentation_path}", mip=0, shape=(n, n, n)))
    queue.execute(progress=False)
    queue.insert(tc.create_mesh_manifest_tasks(f"file://{segmentation_path}"))
    queue.execute(progress=False)
    return ViewerLayers(root, image_path, segmentation_path, image, segmentation)


# ---------------------------------------------------------------- real data for every test module
import os  # noqa: E402
import sys  # noqa: E402

SHARED = Path(os.environ.get("EXACONNECT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
FIB25 = SHARED / "data" / "fib25" / "training_sample2"


def require_shared() -> Path:
    if not FIB25.exists():
        pytest.skip(f"real FIB-25 data not found at {FIB25} (../shared is absent in a user's clone)")
    return SHARED


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def fib25_image() -> np.ndarray:
    """The 250^3 FIB-25 stack, uint8 [z, y, x]."""
    require_shared()
    import imageio.v3 as iio

    files = sorted((FIB25 / "grayscale_maps").glob("*.png"))
    return np.stack([iio.imread(f) for f in files])


@pytest.fixture(scope="session")
def fib25_groundtruth() -> np.ndarray:
    require_shared()
    import h5py

    with h5py.File(FIB25 / "groundtruth.h5", "r") as f:
        return f["stack"][:]


def make_tiny_ffn(path: Path) -> str:
    """A 2-module FFN with fixed random weights saved at `path`: its output is arbitrary but
    deterministic, which is what rerun, resume and stitching guarantees are about."""
    from exaconnect.ffn.checkpoint import save_network
    from exaconnect.ffn.config import FFNConfig, InferenceOptions, ModelConfig
    from exaconnect.ffn.model import ConvStack3D

    config = ModelConfig(depth=2, fov_size=(9, 9, 9), deltas=(2, 2, 2), features=4)
    model = ConvStack3D(config)
    rng = np.random.default_rng(3)
    weights, biases = model.numpy_weights()
    model.assign({k: rng.normal(scale=0.3, size=v.shape) for k, v in weights.items()},
                 {k: rng.normal(scale=0.1, size=v.shape) + (2.0 if k == "conv_lom" else 0.0) for k, v in biases.items()})
    save_network(model, path, FFNConfig(model=config, inference=InferenceOptions(min_segment_size=10)))
    return str(path)


# `make test-quick` (pytest -m quick): the tests of kernels, configs, the registry and the CLI's
# parsing, which start no worker processes and train nothing: a few minutes on two cores, for
# the edit-test loop. `make test` runs everything.
QUICK_MODULES = {
    "test_architecture", "test_bbox", "test_pipeline_config", "test_stage_registry", "test_align_kernels",
    "test_ffn_config", "test_ffn_movement", "test_ffn_seeds", "test_ffn_seed_order", "test_ffn_canvas",
    "test_montage_kernels", "test_montage_manifest", "test_skeleton_metrics", "test_train_loss_weights",
    "test_viewer_paths", "test_viewer_state", "test_reliability_config", "test_reliability_inputs",
}


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """`exaconnect ARGV` in this process: (exit code, stdout, stderr)."""
    from exaconnect.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# `exaconnect queue work` in a process of its own, with the tests' task modules importable.
QUEUE_CLI = [sys.executable, "-m", "exaconnect.cli.queue"]
TASKS_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}


def queue_work(queue, *flags: str, task_module: str = "worker_tasks", timeout: float = 120):
    """`exaconnect queue work QUEUE --task-module worker_tasks FLAGS...`, run to its end; the
    CompletedProcess (text)."""
    import subprocess

    return subprocess.run(QUEUE_CLI + ["work", str(queue), "--task-module", task_module, *flags], env=TASKS_ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line(err: str) -> str:
    """The only non-blank line of `err` (an error must be one line)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in QUICK_MODULES and "slow" not in item.keywords:
            item.add_marker(pytest.mark.quick)
