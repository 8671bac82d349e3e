"""Fidelity to the reference implementation on real FIB-25 data with the published checkpoint.

The reference (google/ffn, same checkpoint and settings) segmented the crop
[0:64, 0:64, 0:64] of training_sample2 into 4 objects with 42 network evaluations.
"""

from pathlib import Path

import numpy as np
import pytest

from exaconnect.ffn.inference import segment_subvolume, segment_subvolumes
from exaconnect.ffn.predictor import load_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PNGS = SHARED / "data" / "fib25" / "training_sample2" / "grayscale_maps"
CHECKPOINT = SHARED / "models" / "ffn-fib25" / "model.ckpt-27465036"
REFERENCE = SHARED / "reference" / "fib25" / "training_sample2_crop64_ffn_segmentation.npz"


def _require(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared FIB-25 material absent: {path} (../shared not present)")


@pytest.fixture(scope="module")
def crop64() -> np.ndarray:
    _require(PNGS)
    import imageio.v3 as iio

    files = sorted(PNGS.glob("*.png"))[:64]
    return np.stack([iio.imread(f) for f in files])[:, :64, :64]


@pytest.fixture(scope="module")
def predictor():
    _require(CHECKPOINT.with_name(CHECKPOINT.name + ".index"))
    return load_model(CHECKPOINT, device="cpu")


@pytest.fixture(scope="module")
def result64(crop64, predictor):
    return segment_subvolume(crop64, predictor)


def test_crop64_matches_the_reference_segmentation(result64):
    _require(REFERENCE)
    from exaconnect.precomputed.evaluate import segmentation_metrics

    reference = np.load(REFERENCE)["segmentation"]
    assert result64.labels.shape == reference.shape
    # Compare whole volumes, unsegmented voxels (0) included on both sides.
    metrics = segmentation_metrics(
        result64.labels.astype(np.int64),
        reference.astype(np.int64),
        ignore_groundtruth_zero=False,
        ignore_segmentation_zero=False,
    )
    assert metrics["vi"] < 0.05, metrics
    assert abs(result64.counters["network-evaluations"] - 42) <= 4
    assert len(result64.objects) == len(np.unique(reference)) - 1


def test_crop64_outputs_are_consistent(result64):
    labels, prob = result64.labels, result64.probabilities
    assert labels.dtype == np.uint64 and prob.dtype == np.uint8
    np.testing.assert_array_equal(prob > 0, labels > 0)
    # segment_threshold 0.6 -> every labelled voxel has probability >= 0.6.
    assert prob[labels > 0].min() >= int(0.6 * 254)
    for obj in result64.objects:
        assert (labels == obj.id).sum() == obj.size
        assert labels[obj.seed] == obj.id
    counters = result64.counters
    assert counters["voxels-segmented"] == (labels > 0).sum()
    assert counters["time-network-s"] > 0 and counters["time-other-s"] >= 0


def test_batched_executor_equals_one_by_one(crop64, predictor, result64):
    # A second, thinner subvolume (a few evaluations) shares the first batched calls.
    thin = np.ascontiguousarray(crop64[:48])
    single = segment_subvolume(thin, predictor)
    assert single.objects
    batched = segment_subvolumes([crop64, thin], predictor, batch_size=2)
    for a, b in zip([result64, single], batched):
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.objects == b.objects
        assert a.counters["network-evaluations"] == b.counters["network-evaluations"]
