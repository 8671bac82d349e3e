"""The stages of a whole-volume segmentation, declared as data for the runner:

    segment.<pass>        one FFN task per subvolume, for each pass in order (`segment.initial`, ...)
    segment.faces         match objects across the faces of neighbouring subvolumes
    segment.equivalence   one task: the global ID equivalence
    segment.relabel       stitched labels into the segmentation layer
    pyramid.segmentation  its downsampled mips (for viewing and meshing at lower mips; on the
                          downsample service)

Each stage requires the one before it. The same names are used by `exaconnect segment
enqueue --stage`, by `exaconnect run` and in the runner's records.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

from exaconnect.errors import InputError

from exaconnect.precomputed.bbox import Box, Triple
from exaconnect.precomputed.layers import LayerUrl, layer_url
from exaconnect.precomputed.stitching import MatchOptions
from exaconnect.services.segment_staging import PassSpec, SegmentRun, default_staging, load_run
from exaconnect.services.stages import Stage

STITCH_STAGES = ("faces", "equivalence", "relabel")


@dataclass(frozen=True)
class SegmentPlan:
    image_layer: LayerUrl
    segmentation_layer: LayerUrl
    passes: tuple[PassSpec, ...]
    subvolume: Triple = (256, 256, 256)
    overlap: Triple = (32, 32, 32)
    bbox: Box | None = None
    staging: LayerUrl | None = None
    match: MatchOptions = MatchOptions()
    downsample_mips: int = 2
    overwrite: bool = True

    def __post_init__(self) -> None:
        # The plan is where a segmentation's layer names are normalised (the CLI and the
        # pipeline hand them in as given): everything below reads them as they are.
        for name in ("image_layer", "segmentation_layer"):
            object.__setattr__(self, name, layer_url(getattr(self, name)))
        object.__setattr__(self, "staging", layer_url(self.staging) if self.staging
                           else default_staging(self.segmentation_layer))

    @property
    def staging_url(self) -> str:
        return self.staging


def pass_stage_name(pass_name: str) -> str:
    return f"segment.{pass_name}"


def _absolute_model(model: str) -> str:
    """Workers may start elsewhere (a pod, a PBS job): a local model path is stored absolute."""
    return os.path.abspath(model) if os.path.exists(model) else str(model)


@dataclass(frozen=True)
class SegmentPass(Stage):
    """One FFN pass: a task per subvolume (the first pass also prepares the run's staging)."""

    service: ClassVar[str] = "segment"
    stage_name: ClassVar[str] = "segment.initial"
    lease_seconds: ClassVar[int] = 3600
    description: ClassVar[str] = "FFN pass per subvolume"
    plan: SegmentPlan
    spec: PassSpec
    first: bool = True
    previous: Stage | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", pass_stage_name(self.spec.name))
        super().__post_init__()

    def requires(self) -> tuple[Stage, ...]:
        return (self.previous,) if self.previous is not None else self.upstream

    def make_tasks(self) -> list:
        from exaconnect.services.segment import add_pass, create_segment_tasks, prepare_run

        plan = self.plan
        if self.first:
            prepare_run(plan.image_layer, plan.segmentation_layer, plan.subvolume, plan.overlap, plan.bbox,
                        plan.staging_url, plan.match, overwrite=plan.overwrite)
        return create_segment_tasks(add_pass(plan.staging_url, self.spec), self.spec.name)

    def reads(self) -> tuple[str, ...]:
        return (self.plan.image_layer, self.spec.model)

    def writes(self) -> tuple[str, ...]:
        return (f"{self.plan.staging_url}/labels/{self.spec.name}",)


@dataclass(frozen=True)
class SegmentStitch(Stage):
    """A stitching step of the final pass: faces, equivalence or relabel."""

    service: ClassVar[str] = "segment"
    stage_name: ClassVar[str] = "segment.faces"
    lease_seconds: ClassVar[int] = 3600
    description: ClassVar[str] = "stitching"
    plan: SegmentPlan
    step: str
    final_pass: str
    previous: Stage

    def __post_init__(self) -> None:
        if self.step not in STITCH_STAGES:
            raise InputError(f"stitching step {self.step!r}: expected one of {STITCH_STAGES}")
        if not self.name:
            object.__setattr__(self, "name", f"segment.{self.step}")
        super().__post_init__()

    def requires(self) -> tuple[Stage, ...]:
        return (self.previous,)

    def make_tasks(self) -> list:
        from exaconnect.services.stitch import create_equivalence_tasks, create_faces_tasks, create_relabel_tasks

        make = {"faces": create_faces_tasks, "equivalence": create_equivalence_tasks,
                "relabel": create_relabel_tasks}[self.step]
        return make(load_run(self.plan.staging_url), self.final_pass)

    def reads(self) -> tuple[str, ...]:
        return (self.plan.staging_url,)

    def writes(self) -> tuple[str, ...]:
        if self.step == "relabel":
            return (self.plan.segmentation_layer,)
        return (f"{self.plan.staging_url}/{self.step}/{self.final_pass}",)


def segment_stages(plan: SegmentPlan, upstream: tuple[Stage, ...] = ()) -> list[Stage]:
    """Every stage of `plan`: the passes in order, stitching, and (with `downsample_mips`) the
    segmentation's pyramid (`pyramid.segmentation`, on the downsample service); the first pass
    requires `upstream` (e.g. the image's ingest or alignment)."""
    from exaconnect.services.downsample import DownsampleStage

    plan = dataclasses.replace(plan, passes=tuple(dataclasses.replace(p, model=_absolute_model(p.model))
                                                  for p in plan.passes))
    stages: list[Stage] = []
    previous: Stage | None = None
    for index, spec in enumerate(plan.passes):
        previous = SegmentPass(plan=plan, spec=spec, first=index == 0, previous=previous,
                               upstream=upstream if index == 0 else ())
        stages.append(previous)
    if previous is None:
        raise InputError("segmentation: expected at least one pass")
    final = plan.passes[-1].name
    for step in STITCH_STAGES:
        previous = SegmentStitch(plan=plan, step=step, final_pass=final, previous=previous)
        stages.append(previous)
    if plan.downsample_mips > 0:
        stages.append(DownsampleStage(layer=plan.segmentation_layer, num_mips=plan.downsample_mips,
                                      upstream=(previous,), name="pyramid.segmentation"))
    return stages


def segment_volume(plan: SegmentPlan, queue_root: str, workers: int = 2, record: str | None = None,
                   progress: bool = True):
    """All stages of `plan` through the runner with `workers` local worker processes; returns
    (the run, the runner's report). Records go beside the staging files unless `record` says."""
    from exaconnect.services.runner import RunnerOptions, run_stages

    stages = segment_stages(plan)
    report = run_stages(stages, RunnerOptions(queue_root, record or f"{plan.staging_url}/run", workers=workers,
                                              progress=progress))
    return load_run(plan.staging_url), report
