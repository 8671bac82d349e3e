"""FFN training data: config loading, partition volume, balanced sampling, augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.ffn.training.augment import Transform, augment_example, drop_sections, misalign, valid_transforms
from exaconnect.ffn.training.config import AugmentConfig, VolumeSource, load_train_config, train_config_from_dict
from exaconnect.ffn.training.data import (
    BalancedSampler,
    cached_partitions,
    compute_partitions,
    extract_example,
    read_volume,
)

VOLUME = {"name": "a", "image": "synthetic:0", "labels": "synthetic:0:labels"}


# --- config ----------------------------------------------------------------------------------

def test_config_yaml_roundtrip_and_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "model: {depth: 3, fov_size: [17, 17, 9], deltas: [4, 4, 2], features: 8}\n"
        "data:\n  volumes:\n    - {name: a, image: synthetic:0, labels: 'synthetic:0:labels', bbox: [0, 0, 0, 64, 64, 32]}\n"
        "optimizer: {name: adam, learning_rate: 0.0005}\n"
        "training: {batch_size: 2, fov_moves: 1, out_dir: runs/x}\n"
    )
    config = load_train_config(path)
    assert config.model.fov_zyx == (9, 17, 17)
    assert config.example_shape_zyx == (9 + 4, 17 + 8, 17 + 8)
    assert config.lom_radius_zyx == (4 + 2, 8 + 4, 8 + 4)
    assert config.data.volumes[0].bbox == (0, 0, 0, 64, 64, 32)
    assert config.optimizer.learning_rate == 0.0005
    assert config.training.batch_size == 2
    # The reference's defaults where the file is silent.
    assert config.training.move_threshold == 0.9 and config.training.seed_pad == 0.05
    assert config.data.thresholds[0] == 0.025


@pytest.mark.parametrize(
    "section, bad, words",
    [
        ("training", {"batch_sise": 4}, "batch_sise"),
        ("optimizer", {"name": "lion"}, "optimizer.name"),
        ("training", {"fov_policy": "random"}, "training.fov_policy"),
        ("augment", {"contrast": -1}, "augment.contrast"),
        ("data", {"thresholds": [0.5, 0.2]}, "data.thresholds"),
        ("training", {"batch_size": 0}, "training.batch_size"),
    ],
)
def test_config_errors_name_the_key(section, bad, words):
    data = {"data": {"volumes": [VOLUME]}}
    data.setdefault(section, {}).update(bad)
    with pytest.raises(InputError, match=words.replace(".", r"\.")):
        train_config_from_dict(data)


def test_config_needs_volumes_and_valid_bbox():
    with pytest.raises(InputError, match="data.volumes"):
        train_config_from_dict({"training": {}})
    with pytest.raises(InputError, match="bbox"):
        VolumeSource("a", "x", "y", bbox=(0, 0, 0, 10, 10, 0))
    with pytest.raises(InputError, match="unknown section"):
        train_config_from_dict({"data": {"volumes": [VOLUME]}, "trainer": {}})


# --- partitions ------------------------------------------------------------------------------

def brute_force_partitions(labels, thresholds, radius):
    out = np.zeros(labels.shape, np.uint8)
    rz, ry, rx = radius
    diameter = np.prod([2 * r + 1 for r in radius])
    for z, y, x in itertools.product(*(range(r, s - r) for r, s in zip(radius, labels.shape))):
        label = labels[z, y, x]
        if label == 0:
            continue
        window = labels[z - rz:z + rz + 1, y - ry:y + ry + 1, x - rx:x + rx + 1]
        fraction = np.sum(window == label) / diameter
        value = len(thresholds) + 1
        for i, th in enumerate(thresholds):
            if fraction < th:
                value = i + 1
                break
        out[z, y, x] = value
    return out


def test_partitions_equal_brute_force():
    rng = np.random.default_rng(0)
    # Blocky labels with background, so fractions spread over many buckets.
    coarse = rng.integers(0, 5, size=(4, 5, 5))
    labels = np.kron(coarse, np.ones((3, 3, 3), dtype=np.int64))[:11, :13, :12].astype(np.uint32) * 7
    thresholds = (0.1, 0.3, 0.5, 0.7, 0.9)
    radius = (1, 2, 2)
    got = compute_partitions(labels, thresholds, radius)
    want = brute_force_partitions(labels, thresholds, radius)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) >= 4
    # Margins and background carry no partition.
    assert not got[:1].any() and not got[:, :2].any() and not got[..., -2:].any()
    assert not got[labels == 0].any()


def test_partitions_min_size_clears_small_objects():
    labels = np.zeros((12, 12, 12), np.uint32)
    labels[:, :, :6] = 1
    labels[:, :, 6:] = 2
    labels[5:7, 5:7, 5:7] = 3  # 8 voxels
    parts = compute_partitions(labels, (0.5,), (1, 1, 1), min_size=9)
    assert not parts[labels == 3].any()
    assert parts[1:-1, 1:-1, 1:4].min() == 2  # interior of object 1: fraction 1 >= 0.5


def test_partitions_cached_once(tmp_path):
    labels = np.repeat(np.arange(1, 5, dtype=np.uint32), 4)[None, None, :].repeat(8, 0).repeat(8, 1)
    source = VolumeSource("v", "img", "lab")
    first = cached_partitions(source, labels, (0.5,), (1, 1, 1), 0, tmp_path)
    files = list(tmp_path.rglob("partitions.npy"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = cached_partitions(source, labels, (0.5,), (1, 1, 1), 0, tmp_path)
    np.testing.assert_array_equal(first, second)
    assert files[0].stat().st_mtime_ns == mtime
    # Other settings get their own cache entry.
    cached_partitions(source, labels, (0.25, 0.5), (1, 1, 1), 0, tmp_path)
    assert len(list(tmp_path.rglob("partitions.npy"))) == 2


# --- sampling ---------------------------------------------------------------------------------

def test_balanced_sampler_equalizes_partitions_and_keeps_margin():
    parts = np.zeros((20, 20, 20), np.uint8)
    parts[2:18, 2:18, 2:18] = 1  # thousands of voxels
    parts[9:11, 9:11, 9:11] = 2  # 8 voxels
    parts[3, 3, 3] = 3  # inside the margin of 4: never drawn
    other = np.zeros((10, 10, 10), np.uint8)
    other[5, 5, 5] = 3
    sampler = BalancedSampler([parts, other], (4, 4, 4))
    assert sampler.counts() == {1: int((parts[4:16, 4:16, 4:16] == 1).sum()), 2: 8, 3: 1}
    rng = np.random.default_rng(0)
    seen = {1: 0, 2: 0, 3: 0}
    for _ in range(3000):
        vi, center = sampler.sample(rng)
        shape = (parts if vi == 0 else other).shape
        assert all(4 <= c < s - 4 for c, s in zip(center, shape))
        seen[int((parts if vi == 0 else other)[center])] += 1
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in seen.values()), seen


def test_sampler_without_coordinates_is_an_error():
    with pytest.raises(InputError, match="no training coordinates"):
        BalancedSampler([np.ones((5, 5, 5), np.uint8)], (3, 3, 3))


# --- reading volumes --------------------------------------------------------------------------

def test_read_volume_from_layers_with_bbox(tmp_path):
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, write_box

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, size=(20, 24, 28), dtype=np.uint8)
    labels = rng.integers(1, 4, size=(20, 24, 28)).astype(np.uint32)
    for name, array, kind in (("img", image, "image"), ("seg", labels, "segmentation")):
        spec = LayerSpec(layer_type=kind, dtype=array.dtype.name, size=(28, 24, 20), resolution=(8, 8, 30),
                         voxel_offset=(0, 0, 0), chunk_size=(16, 16, 16))
        vol = create_layer(str(tmp_path / name), spec, Provenance(stage="test", parameters={}, inputs=[]))
        write_box(vol, Box((0, 0, 0), (28, 24, 20)), array)
    source = VolumeSource("v", str(tmp_path / "img"), str(tmp_path / "seg"), bbox=(2, 3, 4, 20, 21, 18))
    volume = read_volume(source)
    np.testing.assert_array_equal(volume.image, image[4:18, 3:21, 2:20])
    np.testing.assert_array_equal(volume.labels, labels[4:18, 3:21, 2:20])
    assert volume.resolution == (8.0, 8.0, 30.0)
    # The same data as .npy stacks.
    np.save(tmp_path / "img.npy", image)
    np.save(tmp_path / "seg.npy", labels)
    stack = read_volume(VolumeSource("w", str(tmp_path / "img.npy"), str(tmp_path / "seg.npy"),
                                     bbox=(2, 3, 4, 20, 21, 18)))
    np.testing.assert_array_equal(stack.labels, volume.labels)
    with pytest.raises(Exception, match="bbox"):
        read_volume(VolumeSource("x", str(tmp_path / "img"), str(tmp_path / "seg"), bbox=(0, 0, 0, 29, 24, 20)))


def test_extract_example_is_centred():
    labels = np.arange(9 * 9 * 9, dtype=np.uint32).reshape(9, 9, 9) // 9  # rows of 9
    from exaconnect.ffn.training.data import Volume

    volume = Volume("v", labels.astype(np.uint8), labels)
    image, mask = extract_example(volume, (4, 4, 4), (3, 5, 5))
    assert image.shape == mask.shape == (3, 5, 5)
    assert mask[1, 2, 2] and mask[1, 2].all() and mask.sum() == 5
    with pytest.raises(InputError):
        extract_example(volume, (1, 4, 4), (5, 5, 5))


# --- augmentation -----------------------------------------------------------------------------

def test_48_transforms_when_isotropic_16_when_z_differs():
    iso = valid_transforms((10, 10, 10), (9, 9, 9))
    assert len(iso) == 48
    probe = np.random.default_rng(0).random((9, 9, 9))
    assert len({t.apply(probe).tobytes() for t in iso}) == 48  # all distinct
    aniso = valid_transforms((4, 4, 40), (9, 9, 9))
    assert len(aniso) == 16 and all(t.permutation in ((0, 1, 2), (0, 2, 1)) for t in aniso)
    # A patch that is not cubic cannot be permuted either.
    assert len(valid_transforms((10, 10, 10), (5, 9, 9))) == 16
    assert len(valid_transforms((10, 10, 10), (9, 9, 9), permute=False, flip=False)) == 1


def test_transform_keeps_image_and_labels_together():
    rng = np.random.default_rng(3)
    image = rng.random((7, 7, 7)).astype(np.float32)
    labels = image > 0.5
    t = Transform((2, 0, 1), (True, False, True))
    np.testing.assert_array_equal(t.apply(image) > 0.5, t.apply(labels))
    assert t.apply(image).shape == (7, 7, 7)


def test_missing_sections_and_misalignment_keep_the_centre():
    rng = np.random.default_rng(0)
    image = np.ones((9, 11, 11), np.float32)
    dropped = drop_sections(image, rng, probability=1.0)
    assert dropped[4].all() and not dropped[:4].any() and not dropped[5:].any()
    labels = np.zeros((9, 11, 11), bool)
    labels[:, 3:8, 3:8] = True
    image = labels.astype(np.float32)
    for seed in range(20):
        im2, lab2 = misalign(image, labels, np.random.default_rng(seed), 1.0, 3)
        assert lab2[4, 5, 5] and (im2 > 0.5).tolist() == lab2.tolist()
    config = AugmentConfig(contrast=0.0, brightness=0.0, missing_section_probability=0.0,
                           misalignment_probability=0.0)
    out, lab = augment_example(image, labels, rng, config, [])
    np.testing.assert_array_equal(out, image)
