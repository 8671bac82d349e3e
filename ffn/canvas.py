"""The inference canvas: object-mask logits, segmentation and the segment_all loop.

Semantics follow google/ffn `inference.Canvas` (segment_all / segment_at / update_at)
line by line in behaviour; the code is ours. The loop is written as a generator that
*yields* each network request and *receives* the predicted logits, so that one driver can
evaluate requests one at a time and another can batch requests of many canvases into one
network call without changing a single decision of the algorithm.

All coordinates are (z, y, x). The segmentation uses -1 as the reference does, to mark seed
points already tried (cleared to 0 at the end).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Generator

import numpy as np
from scipy.special import expit, logit

from .config import InferenceOptions, ModelConfig
from .movement import FaceMaxMovement
from .seeds import list_seeds, peaks_seeds, within_margin


def _logit32(probability: float) -> np.float32:
    # The reference stores options in a proto (float32) and converts them to logits in place,
    # so every threshold it compares against is the float32 rounding of logit(float32(p)).
    return np.float32(logit(np.float64(np.float32(probability))))


def quantize_probability(probability: np.ndarray) -> np.ndarray:
    """Probability in [0, 1] -> uint8 bucket 1..255 (0 = no data), as reference storage does."""
    buckets = np.digitize(probability, np.linspace(0.0, 1.0, 255))
    buckets[np.isnan(probability)] = 0
    return buckets.astype(np.uint8)


@dataclass(frozen=True)
class PredictRequest:
    """One network evaluation: normalized image and mask-logit patches, FOV-shaped (z, y, x)."""

    image: np.ndarray
    mask_logits: np.ndarray


@dataclass(frozen=True)
class ObjectInfo:
    id: int
    seed: tuple[int, int, int]  # z, y, x
    size: int
    evaluations: int


class Canvas:
    """State of FFN inference over one subvolume."""

    def __init__(self, image: np.ndarray, model: ModelConfig, options: InferenceOptions):
        self.options = options
        # Same arithmetic as the reference Runner: float32 image, float32 mean/stddev.
        self.image = (image.astype(np.float32) - np.float32(options.image_mean)) / np.float32(
            options.image_stddev
        )
        self.shape = self.image.shape
        self.fov = np.array(model.fov_zyx)
        self.margin = self.fov // 2
        self.seed = np.full(self.shape, np.nan, dtype=np.float32)
        self.segmentation = np.zeros(self.shape, dtype=np.int32)
        self.seg_prob = np.zeros(self.shape, dtype=np.uint8)
        self.objects: list[ObjectInfo] = []
        self.overlaps: dict[int, np.ndarray] = {}
        self.counters: Counter[str] = Counter()

        self.init_activation = _logit32(options.init_activation)
        self.pad_value = _logit32(options.pad_value)
        self.move_threshold = _logit32(options.move_threshold)
        self.segment_threshold = _logit32(options.segment_threshold)
        # Reference quirk kept on purpose: the movement policy gets logit(move_threshold)
        # in double precision, not the float32 value the canvas uses.
        self.movement = FaceMaxMovement(
            model.deltas_zyx, float(logit(np.float64(np.float32(options.move_threshold))))
        )
        self._max_id = 0
        self._min_pos = np.zeros(3, dtype=np.int64)
        self._max_pos = np.zeros(3, dtype=np.int64)

    # --- positions ------------------------------------------------------------------------
    def seed_points(self) -> np.ndarray:
        if self.options.seed_policy == "list":
            points = list_seeds(self.options.seeds, self.shape)
        else:
            points = peaks_seeds(self.image)
        points = within_margin(points, self.shape, self.margin)
        return points[::-1] if self.options.seed_order == "reverse" else points

    def fov_slices(self, pos) -> tuple[slice, ...]:
        start = np.asarray(pos) - self.margin
        return tuple(slice(int(s), int(s + f)) for s, f in zip(start, self.fov))

    def is_valid_pos(self, pos, ignore_move_threshold: bool = False) -> bool:
        if not ignore_move_threshold and self.seed[pos] < self.move_threshold:
            self.counters["skip_threshold"] += 1
            return False
        p = np.asarray(pos)
        if np.any(p - self.margin < 0) or np.any(p + self.margin >= self.shape):
            self.counters["skip_invalid_pos"] += 1
            return False
        if self.segmentation[pos] > 0:
            self.counters["skip_invalid_pos"] += 1
            return False
        return True

    # --- one object -----------------------------------------------------------------------
    def _apply_update(self, sel: tuple[slice, ...], logits: np.ndarray) -> np.ndarray:
        """Writes new logits into the canvas, keeping 'outside' decisions (logit < 0) frozen.

        Bias towards oversegmentation (reference `disco_seed_threshold`): a voxel that an
        earlier step called outside cannot be pulled back in, if the FOV has any voxel above
        the move threshold at all. NaN (never predicted) compares false and is not frozen.
        """
        if self.options.disco_seed_threshold >= 0:
            old = self.seed[sel]
            active = np.mean(logits >= self.move_threshold)
            if active > self.options.disco_seed_threshold:
                with np.errstate(invalid="ignore"):
                    frozen = (old < 0) & (logits > old)
                logits[frozen] = old[frozen]
        self.seed[sel] = logits
        return logits

    def segment_at(self, start: tuple[int, int, int]) -> Generator[PredictRequest, np.ndarray, int]:
        """Flood-fills one object from `start`; returns the number of network evaluations."""
        self.seed[...] = np.nan
        self.seed[start] = self.init_activation
        self.movement.reset(start)
        self._min_pos = np.array(start)
        self._max_pos = np.array(start)
        evaluations = 0
        for pos in self.movement.candidates():
            if not self.is_valid_pos(pos):
                continue
            if self.seed[start] < self.move_threshold:
                self.counters["seed_got_too_weak"] += 1
                break
            sel = self.fov_slices(pos)
            mask_in = self.seed[sel].copy()
            mask_in[np.isnan(mask_in)] = self.pad_value
            logits = yield PredictRequest(self.image[sel], mask_in)
            logits = self._apply_update(sel, np.array(logits, dtype=np.float32, copy=True))
            self._min_pos = np.minimum(self._min_pos, pos)
            self._max_pos = np.maximum(self._max_pos, pos)
            evaluations += 1
            self.movement.update(logits, pos)
        return evaluations

    def _mark_tried(self, pos) -> None:
        if self.segmentation[pos] == 0:
            self.segmentation[pos] = -1

    def _commit(self, pos, evaluations: int) -> None:
        """Turns the probability map of a finished object into a segment, if it qualifies."""
        half = self.fov // 2
        sel = tuple(
            slice(max(int(s), 0), int(e) + 1)
            for s, e in zip(self._min_pos - half, self._max_pos + half)
        )
        mask = self.seed[sel] >= self.segment_threshold
        raw_voxels = int(mask.sum())
        seg = self.segmentation[sel]
        overlapped, counts = np.unique(seg[mask], return_counts=True)
        keep = overlapped > 0
        # Only empty voxels (0 or a tried-seed marker) can be claimed by a new object.
        mask &= seg <= 0
        voxels = int(mask.sum())
        if voxels < self.options.min_segment_size:
            self._mark_tried(pos)
            self.counters["invalid_small"] += 1
            return
        self.counters["voxels-segmented"] += voxels
        self.counters["voxels-overlapping"] += raw_voxels - voxels
        self._max_id += 1
        seg[mask] = self._max_id
        self.seg_prob[sel][mask] = quantize_probability(expit(self.seed[sel][mask]))
        self.overlaps[self._max_id] = np.array([overlapped[keep], counts[keep]])
        self.objects.append(
            ObjectInfo(self._max_id, tuple(int(v) for v in pos), voxels, evaluations)
        )

    # --- whole subvolume ------------------------------------------------------------------
    def segment_all(self) -> Generator[PredictRequest, np.ndarray, None]:
        """Tries every seed point in order; yields network requests, receives logits."""
        started = time.perf_counter()
        points = self.seed_points()
        self.counters["seed-points"] = len(points)
        mbd = np.array(self.options.min_boundary_dist_zyx)
        for point in points:
            pos = tuple(int(v) for v in point)
            if not self.is_valid_pos(pos, ignore_move_threshold=True):
                continue
            low = np.maximum(np.asarray(pos) - mbd, 0)
            high = np.asarray(pos) + mbd + 1
            if np.any(self.segmentation[tuple(slice(a, b) for a, b in zip(low, high))] > 0):
                # Too close to an existing object.
                self.segmentation[pos] = -1
                continue
            evaluations = yield from self.segment_at(pos)
            self.counters["segment_at-calls"] += 1
            if evaluations <= 0:
                self.counters["invalid_other"] += 1
                continue
            if self.seed[pos] < self.move_threshold:
                self._mark_tried(pos)
                self.counters["invalid_weak"] += 1
                continue
            self._commit(pos, evaluations)
        self.segmentation[self.segmentation < 0] = 0
        self.counters["segment_all-time-ms"] = int((time.perf_counter() - started) * 1000)
