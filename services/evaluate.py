"""Evaluate: a segmentation layer scored against ground truth (VI split/merge, adapted Rand
error, split and merged bodies) as a queue task, so that a pipeline's scores are a stage like
any other and are recorded with it. The scores go into the run's store as JSON, and a PNG
(per-body scatter and an overlay slice) is written beside them on local storage."""

from __future__ import annotations

import os

from taskqueue import RegisteredTask

from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.layers import layer_url
from exaconnect.precomputed.store import ArtifactStore


class EvaluateTask(RegisteredTask):
    """Score `segmentation` against `groundtruth` (layers, .npy, .npz or file.h5:dataset) in
    `bbox` and store the metrics as `key` in the store at `store`."""

    def __init__(self, segmentation: str, groundtruth: str, store: str, key: str, bbox: list | None = None,
                 ignore_segmentation_zero: bool = False):
        super().__init__(segmentation, groundtruth, store, key, bbox, ignore_segmentation_zero)

    def execute(self) -> None:
        from exaconnect.precomputed.evaluate_report import evaluate

        store = ArtifactStore(self.store)
        box = Box.from_list(self.bbox) if self.bbox else None
        local = store.local_file(self.key)
        if local is not None:
            os.makedirs(os.path.dirname(local), exist_ok=True)
        # evaluate() writes the JSON and a PNG beside it; the store then vouches for the JSON.
        metrics = evaluate(self.segmentation, self.groundtruth, box, local, bool(self.ignore_segmentation_zero))
        store.put_json(self.key, metrics)


def evaluate_stage(segmentation: str, groundtruth: str, store: str, key: str = "evaluate/scores.json",
                   requires: tuple[str, ...] = (), bbox: Box | None = None, name: str = "evaluate"):
    from exaconnect.services.stages import Stage

    seg = layer_url(segmentation) if "://" in segmentation or os.path.isdir(segmentation) else segmentation
    return Stage(name, "evaluate",
                 lambda: [EvaluateTask(seg, groundtruth, layer_url(store), key, bbox.to_list() if bbox else None)],
                 requires, reads=(seg, groundtruth), writes=(f"{layer_url(store)}/{key}",),
                 parameters={"segmentation": seg, "groundtruth": groundtruth, "bbox": bbox.to_list() if bbox else None},
                 description="VI and adapted Rand error against ground truth")


def read_scores(store: str, key: str = "evaluate/scores.json") -> dict | None:
    return ArtifactStore(store).get_json(key)
