"""The stages of a whole-volume segmentation, declared as data for the runner:

    segment.<pass>        one FFN task per subvolume, for each pass in order (`segment.initial`, ...)
    segment.faces         match objects across the faces of neighbouring subvolumes
    segment.equivalence   one task: the global ID equivalence
    segment.relabel       stitched labels into the segmentation layer
    segment.pyramid       its downsampled mips (for viewing and meshing at lower mips)

Each stage requires the one before it. The same names are used by `exaconnect segment
enqueue --stage`, by `exaconnect run` and in the runner's records.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from exaconnect.precomputed.bbox import Box, Triple
from exaconnect.precomputed.layers import layer_url
from exaconnect.precomputed.stitching import MatchOptions
from exaconnect.services.segment_staging import PassSpec, SegmentRun, default_staging, load_run
from exaconnect.services.stages import Stage

STITCH_STAGES = ("faces", "equivalence", "relabel")


@dataclass(frozen=True)
class SegmentPlan:
    image_layer: str
    segmentation_layer: str
    passes: tuple[PassSpec, ...]
    subvolume: Triple = (256, 256, 256)
    overlap: Triple = (32, 32, 32)
    bbox: Box | None = None
    staging: str | None = None
    match: MatchOptions = MatchOptions()
    downsample_mips: int = 2
    overwrite: bool = True

    @property
    def staging_url(self) -> str:
        return layer_url(self.staging) if self.staging else default_staging(layer_url(self.segmentation_layer))

    def as_parameters(self) -> dict:
        return {"image_layer": layer_url(self.image_layer), "segmentation_layer": layer_url(self.segmentation_layer),
                "subvolume": list(self.subvolume), "overlap": list(self.overlap),
                "bbox": self.bbox.to_list() if self.bbox else None, "staging": self.staging_url,
                "match": dataclasses.asdict(self.match)}


def pass_stage_name(pass_name: str) -> str:
    return f"segment.{pass_name}"


def _absolute_model(model: str) -> str:
    """Workers may start elsewhere (a pod, a PBS job): a local model path is stored absolute."""
    return os.path.abspath(model) if os.path.exists(model) else str(model)


def segment_stages(plan: SegmentPlan, requires: tuple[str, ...] = (), lease_seconds: int = 3600) -> list[Stage]:
    """Every stage of `plan`, the first requiring `requires` (e.g. the image's ingest/align)."""
    from exaconnect.services.downsample import create_downsample_tasks
    from exaconnect.services.segment import add_pass, create_segment_tasks, prepare_run
    from exaconnect.services.stitch import create_equivalence_tasks, create_faces_tasks, create_relabel_tasks

    passes = tuple(dataclasses.replace(p, model=_absolute_model(p.model)) for p in plan.passes)
    staging = plan.staging_url
    image, out = layer_url(plan.image_layer), layer_url(plan.segmentation_layer)
    stages: list[Stage] = []
    previous = tuple(requires)
    for index, spec in enumerate(passes):
        def make(spec=spec, first=(index == 0)):
            if first:
                prepare_run(plan.image_layer, plan.segmentation_layer, plan.subvolume, plan.overlap, plan.bbox,
                            staging, plan.match, overwrite=plan.overwrite)
            run = add_pass(staging, spec)
            return create_segment_tasks(run, spec.name)

        name = pass_stage_name(spec.name)
        stages.append(Stage(name, "segment", make, previous, reads=(image, spec.model), writes=(f"{staging}/labels/{spec.name}",),
                            parameters={**plan.as_parameters(), "pass": dataclasses.asdict(spec)},
                            lease_seconds=lease_seconds, description=f"FFN pass {spec.name} per subvolume"))
        previous = (name,)
    final = passes[-1].name if passes else None
    for step, make_tasks in zip(STITCH_STAGES, (create_faces_tasks, create_equivalence_tasks, create_relabel_tasks)):
        name = f"segment.{step}"
        writes = (out,) if step == "relabel" else (f"{staging}/{step}/{final}",)
        stages.append(Stage(name, "segment", lambda make_tasks=make_tasks: make_tasks(load_run(staging), final),
                            previous, reads=(staging,), writes=writes,
                            parameters={**plan.as_parameters(), "pass": final}, lease_seconds=lease_seconds,
                            description=f"stitching: {step}"))
        previous = (name,)
    if plan.downsample_mips > 0:
        stages.append(Stage("segment.pyramid", "downsample",
                            lambda: list(create_downsample_tasks(out, num_mips=plan.downsample_mips)),
                            previous, reads=(out,), writes=(out,), parameters={"layer": out, "num_mips": plan.downsample_mips},
                            description="mips of the segmentation"))
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
