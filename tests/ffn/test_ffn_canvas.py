"""Canvas semantics on a synthetic volume with an oracle network (no TensorFlow weights).

The oracle predicts 'inside' (3 plus a bump peaking at the FOV centre, so that face maxima
lie straight ahead) for every voxel of the FOV whose intensity equals the intensity at the
FOV centre and 'outside' (-4) elsewhere, so the expected segmentation is known exactly.
"""

from dataclasses import dataclass

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.ffn.canvas import Canvas, quantize_probability
from exaconnect.ffn.config import FFNConfig, InferenceOptions, ModelConfig
from exaconnect.ffn.inference import segment_subvolume, segment_subvolumes

MODEL = ModelConfig(depth=1, fov_size=(9, 9, 9), deltas=(4, 4, 4), features=1)


@dataclass
class OraclePredictor:
    config: FFNConfig
    calls: int = 0
    batch_sizes: tuple = ()

    @property
    def model_config(self):
        return self.config.model

    def __call__(self, images, mask_logits):
        self.calls += 1
        self.batch_sizes = self.batch_sizes + (len(images),)
        centre = images[:, 4, 4, 4][:, None, None, None]
        z, y, x = np.mgrid[-4:5, -4:5, -4:5]
        bump = np.exp(-(z**2 + y**2 + x**2) / 20.0)
        return np.where(images == centre, 3.0 + bump, -4.0).astype(np.float32)


def _slabs(shape=(41, 41, 45)):
    """Three slabs along x separated by one-voxel dark membranes at x=15 and x=31.

    With FOV 9 and steps of 4 from the seeds below, FOV positions tile every slab exactly.
    """
    image = np.full(shape, 20, np.uint8)
    labels = np.zeros(shape, np.uint64)
    for k, (lo, hi, value) in enumerate([(0, 15, 100), (16, 31, 150), (32, 45, 200)], start=1):
        image[:, :, lo:hi] = value
        labels[:, :, lo:hi] = k
    return image, labels


def _options(**kwargs):
    base = dict(seed_policy="list", seeds=[(20, 20, 4), (20, 20, 20), (20, 20, 36)])
    base.update(kwargs)
    return InferenceOptions(**base)


def _predictor(options):
    return OraclePredictor(FFNConfig(model=MODEL, inference=options))


def test_oracle_segmentation_is_exact():
    image, expected = _slabs()
    options = _options()
    result = segment_subvolume(image, _predictor(options), options)
    np.testing.assert_array_equal(result.labels, expected)
    assert result.labels.dtype == np.uint64
    assert [(o.id, o.seed) for o in result.objects] == [(1, (20, 20, 4)), (2, (20, 20, 20)), (3, (20, 20, 36))]
    assert [o.size for o in result.objects] == [41 * 41 * 15, 41 * 41 * 15, 41 * 41 * 13]
    np.testing.assert_array_equal(result.probabilities > 0, expected > 0)
    lowest = quantize_probability(np.array([1 / (1 + np.exp(-3.0))]))[0]
    assert result.probabilities[expected > 0].min() >= lowest
    assert result.counters["network-evaluations"] == sum(o.evaluations for o in result.objects)
    assert result.counters["voxels-segmented"] == (expected > 0).sum()


def test_seed_inside_an_existing_object_is_skipped():
    image, expected = _slabs()
    options = _options(seeds=[(20, 20, 4), (30, 30, 8)])
    result = segment_subvolume(image, _predictor(options), options)
    assert len(result.objects) == 1
    assert result.counters["skip_invalid_pos"] >= 1


def test_min_boundary_dist_keeps_seeds_off_existing_objects():
    image, _ = _slabs()
    # A seed on the membrane next to object 1: the membrane plane would be a valid object.
    seeds = [(20, 20, 4), (20, 20, 15)]
    near = segment_subvolume(image, _predictor(_options(seeds=seeds)), _options(seeds=seeds))
    assert len(near.objects) == 1
    far = _options(seeds=seeds, min_boundary_dist=(0, 0, 0))
    result = segment_subvolume(image, _predictor(far), far)
    assert len(result.objects) == 2 and result.objects[1].size == 41 * 41


def test_small_objects_are_rejected():
    image, _ = _slabs()
    image[18:23, 18:23, 34:39] = 250
    options = _options(seeds=[(20, 20, 36)], min_segment_size=1000)
    result = segment_subvolume(image, _predictor(options), options)
    assert result.objects == [] and result.counters["invalid_small"] == 1
    assert not result.labels.any()
    options = _options(seeds=[(20, 20, 36)], min_segment_size=100)
    assert segment_subvolume(image, _predictor(options), options).objects[0].size == 125


def test_outside_voxels_cannot_be_regrown():
    canvas = Canvas(np.zeros((9, 9, 9), np.uint8), MODEL, InferenceOptions())
    sel = canvas.fov_slices((4, 4, 4))
    canvas.seed[sel] = np.nan
    canvas.seed[0, 0, 0] = -1.0  # called outside earlier
    canvas.seed[0, 0, 1] = 1.0  # inside earlier, may change freely
    update = np.full((9, 9, 9), 5.0, np.float32)
    out = canvas._apply_update(sel, update.copy())
    assert out[0, 0, 0] == -1.0 and out[0, 0, 1] == 5.0 and out[4, 4, 4] == 5.0
    # When nothing in the FOV reaches the move threshold the freeze does not apply.
    canvas.seed[0, 0, 0] = -1.0
    weak = np.full((9, 9, 9), 0.5, np.float32)
    assert canvas._apply_update(sel, weak.copy())[0, 0, 0] == 0.5


def test_batched_canvases_equal_one_by_one():
    image, _ = _slabs()
    other = image[:, :, ::-1].copy()
    options = _options(seeds=[(20, 20, 4), (20, 20, 20), (20, 20, 36), (10, 30, 24)])
    singles = [segment_subvolume(im, _predictor(options), options) for im in (image, other, image)]
    predictor = _predictor(options)
    batched = segment_subvolumes([image, other, image], predictor, options, batch_size=3)
    assert max(predictor.batch_sizes) == 3
    for a, b in zip(singles, batched):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
        assert a.objects == b.objects


def test_image_smaller_than_the_fov_is_rejected():
    options = _options()
    with pytest.raises(InputError, match="field of view"):
        segment_subvolume(np.zeros((5, 40, 40), np.uint8), _predictor(options), options)
