"""Evaluate: a segmentation layer scored against ground truth (VI split/merge, adapted Rand
error, split and merged bodies; beside them an empty segmentation's and a watershed's scores when
the image is given) as a queue task, so that a pipeline's scores are a stage like
any other and are recorded with it. The scores go into the run's store as JSON, and a PNG
(per-body scatter and an overlay slice) is written beside them on local storage."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from taskqueue import RegisteredTask

from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.store import ArtifactStore
from exaconnect.services.stages import Stage

if TYPE_CHECKING:
    from exaconnect.precomputed.layers import LayerUrl


class EvaluateTask(RegisteredTask):
    """Score `segmentation` against `groundtruth` (layers, .npy, .npz or file.h5:dataset) in
    `bbox` and store the metrics as `key` in the store at `store`."""

    def __init__(self, segmentation: str, groundtruth: str, store: str, key: str, bbox: list | None = None,
                 ignore_segmentation_zero: bool = False, skeletons: str | None = None, kimimaro: dict | None = None,
                 merge_min_nodes: int = 1, resolution: list | None = None, ignore_groundtruth_zero: bool = True,
                 image: str | None = None, watershed: dict | None = None):
        """Skeleton scores are added when `skeletons` (a segmentation layer with a skeleton source)
        or `kimimaro` (KimimaroParameters fields, for skeletons of the ground truth) is given; the
        baselines (an empty segmentation, a watershed of `image` with `watershed`'s
        WatershedParameters fields) when `image` is given."""
        super().__init__(segmentation, groundtruth, store, key, bbox, ignore_segmentation_zero, skeletons, kimimaro,
                         merge_min_nodes, resolution, ignore_groundtruth_zero, image, watershed)

    def skeleton_options(self):
        from exaconnect.precomputed.evaluate_report import SkeletonOptions
        from exaconnect.precomputed.skeleton_metrics import KimimaroParameters

        if self.skeletons is None and self.kimimaro is None:
            return None
        kimimaro = None
        if self.kimimaro is not None:
            fields = dict(self.kimimaro)
            if "anisotropy" in fields:
                fields["anisotropy"] = tuple(fields["anisotropy"])
            kimimaro = KimimaroParameters(**fields)
        return SkeletonOptions(layer=self.skeletons, kimimaro=kimimaro, merge_min_nodes=int(self.merge_min_nodes),
                               resolution=tuple(self.resolution) if self.resolution else None)

    def execute(self) -> None:
        from exaconnect.precomputed.baselines import WatershedParameters
        from exaconnect.precomputed.evaluate_report import evaluate

        store = ArtifactStore(self.store)
        box = Box.from_list(self.bbox) if self.bbox else None
        local = store.local_file(self.key)
        if local is not None:
            os.makedirs(os.path.dirname(local), exist_ok=True)
        # evaluate() writes the JSON and a PNG beside it; the store then vouches for the JSON.
        metrics = evaluate(self.segmentation, self.groundtruth, box, local, bool(self.ignore_segmentation_zero),
                           self.skeleton_options(), bool(self.ignore_groundtruth_zero), self.image,
                           WatershedParameters.from_dict(self.watershed))
        store.put_json(self.key, metrics)


@dataclass(frozen=True)
class EvaluateStage(Stage):
    """`segmentation` scored against `groundtruth`, the scores stored as `key` in `store`."""

    service: ClassVar[str] = "evaluate"
    stage_name: ClassVar[str] = "evaluate"
    description: ClassVar[str] = "VI, adapted Rand error and expected run length against ground truth, beside baselines"
    segmentation: LayerUrl
    groundtruth: LayerUrl
    store: str
    key: str = "evaluate/scores.json"
    bbox: Box | None = None
    # Skeleton scores (expected run length, merges): ground-truth skeletons from a skeleton layer,
    # or made from the ground truth by kimimaro with these KimimaroParameters fields.
    skeletons: str | None = None
    kimimaro: Mapping[str, Any] | None = None
    merge_min_nodes: int = 1
    # The segmented image: an empty segmentation and a seeded watershed of it (WatershedParameters
    # fields in `watershed`, default if None) are scored beside the segmentation, as `baselines`.
    image: LayerUrl | None = None
    watershed: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.watershed is not None:
            from exaconnect.precomputed.baselines import WatershedParameters

            WatershedParameters.from_dict(self.watershed)  # a bad option fails when the run is planned

    def make_tasks(self) -> list:
        return [EvaluateTask(self.segmentation, self.groundtruth, self.store, self.key,
                             self.bbox.to_list() if self.bbox else None, False, self.skeletons,
                             dict(self.kimimaro) if self.kimimaro is not None else None, self.merge_min_nodes,
                             None, True, self.image, dict(self.watershed) if self.watershed is not None else None)]

    def reads(self) -> tuple[str, ...]:
        return (self.segmentation, self.groundtruth) + ((self.image,) if self.image else ())

    def writes(self) -> tuple[str, ...]:
        return (f"{self.store}/{self.key}",)
