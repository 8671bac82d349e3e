"""Training data for FFNs: volumes read from layers, the partition volume, balanced sampling.

The partition volume follows the reference's `compute_partitions.py`: for each labelled voxel,
the fraction of voxels within a box of radius `lom_radius` that carry the same label,
quantized by `thresholds` into 1..len(thresholds)+1 (0 = no partition: background, objects
below `min_size`, and the margin of one radius where the box does not fit). Examples are then
drawn so that every partition is equally likely (reference `build_coordinates.py`), which
keeps thin processes and object boundaries from being drowned by the interiors of big bodies.

All arrays are (z, y, x).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from exaconnect.errors import InputError

from .config import VolumeSource

logger = logging.getLogger(__name__)

PARTITION_FILENAME = "partitions.npy"


@dataclass
class Volume:
    """An image with its labels over the same grid; `origin` is the bbox start (x, y, z)."""

    name: str
    image: np.ndarray  # uint8/uint16/float32 [z, y, x]
    labels: np.ndarray  # integer [z, y, x]
    resolution: tuple[float, float, float] = (1.0, 1.0, 1.0)  # x, y, z
    origin: tuple[int, int, int] = (0, 0, 0)  # x, y, z


def _is_layer(path: str) -> bool:
    from exaconnect.precomputed.layers import read_info

    text = str(path)
    if text.startswith(("gs://", "s3://", "http://", "https://", "precomputed://", "file://")):
        return True
    return Path(text).is_dir() and (Path(text) / "info").is_file() and read_info(text) is not None


def _read_layer(path: str, bbox: tuple[int, ...] | None) -> tuple[np.ndarray, tuple[float, float, float], tuple[int, int, int]]:
    from exaconnect.precomputed.bbox import Box, require_inside
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box

    vol = open_layer(path)
    bounds = layer_bounds(vol)
    box = bounds if bbox is None else Box(tuple(bbox[:3]), tuple(bbox[3:]))  # type: ignore[arg-type]
    require_inside(box, bounds, f"bbox of {path}")
    resolution = tuple(float(r) for r in vol.meta.resolution(0))
    return read_box(vol, box), resolution, tuple(box.start)  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _synthetic(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

    image, labels = synthetic_volume(SyntheticSpec(seed=seed))
    image.setflags(write=False)
    labels.setflags(write=False)
    return image, labels


def _read_stack(path: str, bbox: tuple[int, ...] | None) -> tuple[np.ndarray, tuple[int, int, int]]:
    if path.startswith("synthetic:"):
        try:
            seed_text, _, kind = path[len("synthetic:"):].partition(":")
            seed = int(seed_text or 0)
        except ValueError:
            raise InputError(f"{path}: expected synthetic:SEED[:image|labels]") from None
        image, labels = _synthetic(seed)
        array = labels if kind == "labels" else image
    else:
        from exaconnect.precomputed.sources import open_source

        source = open_source(path)
        array = source.read_slab(0, source.shape[0])
    if bbox is None:
        return np.asarray(array), (0, 0, 0)
    x0, y0, z0, x1, y1, z1 = bbox
    if z1 > array.shape[0] or y1 > array.shape[1] or x1 > array.shape[2]:
        raise InputError(f"{path}: bbox {list(bbox)} exceeds the stack of shape (z, y, x) {array.shape}")
    return np.ascontiguousarray(array[z0:z1, y0:y1, x0:x1]), (x0, y0, z0)


def read_volume(source: VolumeSource) -> Volume:
    """Loads the image and labels of `source` (only its bbox) into memory."""
    arrays = []
    resolution = source.resolution
    origin = (0, 0, 0)
    for path in (source.image, source.labels):
        if _is_layer(path):
            array, layer_res, origin = _read_layer(path, source.bbox)
            resolution = resolution or layer_res
        else:
            array, origin = _read_stack(path, source.bbox)
        arrays.append(array)
    image, labels = arrays
    if image.shape != labels.shape:
        raise InputError(f"volume {source.name}: image {image.shape} and labels {labels.shape} differ in shape")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"volume {source.name}: labels {source.labels} have dtype {labels.dtype}; expected integers")
    return Volume(source.name, image, labels, tuple(resolution or (1.0, 1.0, 1.0)), origin)  # type: ignore[arg-type]


# --- partitions ----------------------------------------------------------------------------

def clear_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with objects smaller than `min_size` voxels set to 0."""
    if min_size <= 0:
        return labels
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    small = counts < min_size
    if not small.any():
        return labels
    out = labels.copy()
    out[small[inverse.reshape(labels.shape)]] = 0
    return out


def compute_partitions(labels: np.ndarray, thresholds: Sequence[float], lom_radius_zyx: Sequence[int],
                       min_size: int = 0) -> np.ndarray:
    """uint8 partition of every voxel (same shape as `labels`; 0 = none).

    Each object is processed inside its own bounding box grown by the radius, so the cost
    scales with the objects' extent rather than (objects x volume).
    """
    labels = clear_small(np.asarray(labels), min_size)
    radius = np.asarray(lom_radius_zyx, dtype=int)
    if labels.ndim != 3 or radius.shape != (3,) or np.any(radius < 0):
        raise InputError(f"compute_partitions: labels {labels.shape}, lom_radius {lom_radius_zyx}: expected 3-D")
    diameter = 2 * radius + 1
    thresholds = np.asarray(thresholds, dtype=np.float64)
    output = np.zeros(labels.shape, dtype=np.uint8)
    valid = tuple(slice(r, s - r) for r, s in zip(radius, labels.shape))
    if any(s.start >= s.stop for s in valid):
        return output
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32)
    if ids[0] == 0:
        inverse -= 1  # background -> -1, first object -> 0
        ids = ids[1:]
    boxes = ndimage.find_objects(inverse + 1)
    volume = float(np.prod(diameter))
    for index, box in enumerate(boxes):
        if box is None:
            continue
        grown = tuple(slice(max(b.start - r, 0), min(b.stop + r, n)) for b, r, n in zip(box, radius, labels.shape))
        mask = inverse[grown] == index
        # Windows reaching past the volume only matter for margin voxels, which get no partition.
        sums = ndimage.uniform_filter(mask.astype(np.float64), size=diameter, mode="constant") * volume
        fraction = np.round(sums) / volume
        part = (np.digitize(fraction, thresholds) + 1).astype(np.uint8)
        target = output[grown]
        target[mask] = part[mask]
    inside = np.zeros(labels.shape, dtype=bool)
    inside[valid] = True
    output[~inside] = 0
    return output


def partition_cache_key(source: VolumeSource, thresholds: Sequence[float], lom_radius_zyx: Sequence[int],
                        min_size: int) -> str:
    record = {"labels": source.labels, "bbox": list(source.bbox) if source.bbox else None,
              "thresholds": [float(t) for t in thresholds], "lom_radius_zyx": [int(r) for r in lom_radius_zyx],
              "min_size": int(min_size)}
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cached_partitions(source: VolumeSource, labels: np.ndarray, thresholds: Sequence[float],
                      lom_radius_zyx: Sequence[int], min_size: int, cache_dir: str | Path) -> np.ndarray:
    """The partition volume of `source`, computed once and kept in `cache_dir/<key>/`.

    For volumes too big for one node, the `train-partition` queue tasks (services/train.py)
    write a partition layer instead, named by the volume's `partitions` option.
    """
    key = partition_cache_key(source, thresholds, lom_radius_zyx, min_size)
    folder = Path(cache_dir) / f"{source.name}-{key}"
    path = folder / PARTITION_FILENAME
    if path.is_file():
        partitions = np.load(path)
        if partitions.shape == labels.shape:
            return partitions
    partitions = compute_partitions(labels, thresholds, lom_radius_zyx, min_size)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (PARTITION_FILENAME + ".tmp.npy")
    np.save(tmp, partitions)
    tmp.replace(path)
    (folder / "partition.json").write_text(json.dumps({
        "labels": source.labels, "bbox": source.bbox, "thresholds": list(thresholds),
        "lom_radius_zyx": list(lom_radius_zyx), "min_size": min_size,
        "counts": {int(v): int(c) for v, c in zip(*np.unique(partitions, return_counts=True))},
    }, indent=1))
    return partitions


# --- balanced sampling ---------------------------------------------------------------------

class BalancedSampler:
    """Draws example centres so that every partition value is equally likely.

    Equivalent in distribution to the reference's table of coordinates in which each
    partition's list is resampled to the size of the largest one, without materializing it.
    Centres are restricted to where a patch of `margin_zyx` on each side fits.
    """

    def __init__(self, partitions: Sequence[np.ndarray], margin_zyx: Sequence[int]):
        self.groups: list[tuple[np.ndarray, np.ndarray]] = []  # (volume index, flat index) per value
        margin = np.asarray(margin_zyx, dtype=int)
        per_value: dict[int, list[tuple[int, np.ndarray]]] = {}
        self.shapes = [p.shape for p in partitions]
        for vi, part in enumerate(partitions):
            inside = np.zeros(part.shape, dtype=bool)
            sel = tuple(slice(m, s - m) for m, s in zip(margin, part.shape))
            if all(s.start < s.stop for s in sel):
                inside[sel] = True
            flat = np.flatnonzero(inside & (part > 0))
            values = part.ravel()[flat]
            for value in np.unique(values):
                per_value.setdefault(int(value), []).append((vi, flat[values == value]))
        for value in sorted(per_value):
            vols = np.concatenate([np.full(len(f), vi, dtype=np.int32) for vi, f in per_value[value]])
            flats = np.concatenate([f for _, f in per_value[value]])
            self.groups.append((vols, flats))
        self.values = sorted(per_value)
        if not self.groups:
            raise InputError(
                f"no training coordinates: no labelled voxel has a partition and a margin of {tuple(margin)} "
                "(volumes too small for the FOV, or every object below data.min_size)")

    def counts(self) -> dict[int, int]:
        return {v: len(g[1]) for v, g in zip(self.values, self.groups)}

    def sample(self, rng: np.random.Generator) -> tuple[int, tuple[int, int, int]]:
        """(volume index, centre (z, y, x))."""
        vols, flats = self.groups[int(rng.integers(len(self.groups)))]
        i = int(rng.integers(len(flats)))
        vi = int(vols[i])
        center = np.unravel_index(int(flats[i]), self.shapes[vi])
        return vi, tuple(int(c) for c in center)  # type: ignore[return-value]


# --- examples ------------------------------------------------------------------------------

def normalize(image: np.ndarray, mean: float, stddev: float) -> np.ndarray:
    return (image.astype(np.float32) - np.float32(mean)) / np.float32(stddev)


def extract_example(volume: Volume, center_zyx: Sequence[int], shape_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(image patch, bool mask of the centre's object), both `shape_zyx`, centred on the voxel."""
    start = np.asarray(center_zyx) - np.asarray(shape_zyx) // 2
    sel = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, shape_zyx))
    if np.any(start < 0) or any(s.stop > n for s, n in zip(sel, volume.labels.shape)):
        raise InputError(f"example at {tuple(center_zyx)} of shape {tuple(shape_zyx)} leaves volume {volume.name}")
    labels = volume.labels[sel]
    return volume.image[sel], labels == volume.labels[tuple(int(c) for c in center_zyx)]


class ExampleSource:
    """Volumes + their partitions + a sampler: `draw(rng)` gives (image float32, object mask)."""

    def __init__(self, volumes: list[Volume], partitions: list[np.ndarray], shape_zyx: Sequence[int],
                 image_mean: float, image_stddev: float):
        self.volumes = volumes
        self.shape = tuple(int(s) for s in shape_zyx)
        self.mean = image_mean
        self.stddev = image_stddev
        self.sampler = BalancedSampler(partitions, [s // 2 for s in self.shape])

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        vi, center = self.sampler.sample(rng)
        image, mask = extract_example(self.volumes[vi], center, self.shape)
        return normalize(image, self.mean, self.stddev), mask, vi


def build_example_source(sources: Sequence[VolumeSource], shape_zyx: Sequence[int], lom_radius_zyx: Sequence[int],
                         thresholds: Sequence[float], min_size: int, image_mean: float, image_stddev: float,
                         cache_dir: str | Path) -> ExampleSource:
    volumes, partitions = [], []
    for source in sources:
        volume = read_volume(source)
        if source.partitions:
            # Computed by queue tasks for a big volume (services/train.py); read like the labels.
            part, *_ = _read_layer(source.partitions, source.bbox)
            if part.shape != volume.labels.shape:
                raise InputError(f"volume {source.name}: partitions {source.partitions} have shape {part.shape}, "
                                 f"labels {volume.labels.shape}")
            partitions.append(part.astype(np.uint8))
        else:
            partitions.append(cached_partitions(source, volume.labels, thresholds, lom_radius_zyx, min_size,
                                                cache_dir))
        volumes.append(volume)
        logger.info("training volume %s: shape %s, %d partitioned voxels", source.name, volume.labels.shape,
                    int((partitions[-1] > 0).sum()))
    return ExampleSource(volumes, partitions, shape_zyx, image_mean, image_stddev)
