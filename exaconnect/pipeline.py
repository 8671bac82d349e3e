"""`exaconnect run PIPELINE.yaml`: source -> ingest -> (misalign) -> align -> segment (passes)
-> stitch -> pyramid -> mesh -> skeletons -> evaluate -> link, as one list of stages for the
runner. `make demo` is `configs/demo.yaml`; the same file runs across many nodes when its
queue root is a shared folder and workers run there (`workers: 0`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from exaconnect.errors import InputError
from exaconnect.pipeline_config import PipelineConfig, to_mapping

log = logging.getLogger("exaconnect.pipeline")

LAYER_PREFIX = "precomputed://"


@dataclass
class PipelinePlan:
    """The stages of a run and the layers they produce (for links and reports)."""

    config: PipelineConfig
    output: str
    stages: list = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)
    scores_key: str | None = None
    alignment_layer: str | None = None


def _output_url(config: PipelineConfig) -> str:
    from exaconnect.precomputed.layers import layer_url

    return layer_url(config.output)


def _synthetic_source(config: PipelineConfig, output: str) -> tuple[str, str]:
    """The built-in sample as .npy files in the output folder (written once, deterministic)."""
    import numpy as np

    from exaconnect.precomputed.layers import local_path
    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

    root = local_path(output)
    if root is None:
        raise InputError(f"output {output}: the synthetic sample needs a local output folder")
    os.makedirs(root, exist_ok=True)
    x, y, z = config.source.synthetic_shape
    seed = config.source.synthetic_seed
    image_path = os.path.join(root, f"sample_{x}x{y}x{z}_seed{seed}_image.npy")
    labels_path = os.path.join(root, f"sample_{x}x{y}x{z}_seed{seed}_labels.npy")
    if not (os.path.exists(image_path) and os.path.exists(labels_path)):
        image, labels = synthetic_volume(SyntheticSpec(shape=(z, y, x), seed=seed))
        for path, array in ((image_path, image), (labels_path, labels)):
            tmp = path + ".tmp.npy"
            np.save(tmp, array)
            os.replace(tmp, path)
    return image_path, labels_path


def build_plan(config: PipelineConfig) -> PipelinePlan:
    """Every stage of the run, in dependency order; nothing is written here except the
    synthetic sample's source files."""
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.stitching import MatchOptions
    from exaconnect.services.downsample import downsample_stage
    from exaconnect.services.ingest import IngestOptions, ingest_stage
    from exaconnect.services.mesh import mesh_stages
    from exaconnect.services.segment_run import SegmentPlan, segment_stages
    from exaconnect.services.segment_staging import PassSpec
    from exaconnect.services.skeletonize import skeleton_stages
    from exaconnect.services.stages import Stage

    output = _output_url(config)
    plan = PipelinePlan(config, output)
    stages = plan.stages

    def layer(name: str) -> str:
        return f"{output}/{name}"

    source = config.source
    image_src, labels_src = source.image, source.groundtruth
    if image_src == "synthetic":
        image_src, synthetic_labels = _synthetic_source(config, output)
        labels_src = labels_src or synthetic_labels

    # ---- ingest (or an existing layer)
    image_requires: tuple[str, ...] = ()
    if image_src.startswith(LAYER_PREFIX):
        image = image_src[len(LAYER_PREFIX):]
    else:
        image = layer("image")
        options = IngestOptions("image", source.resolution, config.ingest.voxel_offset, config.ingest.chunk_size,
                                config.ingest.encoding, overwrite=True)
        stages.append(ingest_stage(image_src, image, options, name="ingest.image"))
        image_requires = ("ingest.image",)
    groundtruth, gt_requires = None, ()
    if labels_src:
        if labels_src.startswith(LAYER_PREFIX):
            groundtruth = labels_src[len(LAYER_PREFIX):]
        else:
            groundtruth = layer("groundtruth")
            options = IngestOptions("segmentation", source.resolution, config.ingest.voxel_offset,
                                    config.ingest.chunk_size, overwrite=True)
            stages.append(ingest_stage(labels_src, groundtruth, options, name="ingest.groundtruth"))
            gt_requires = ("ingest.groundtruth",)
    plan.layers["image"] = image
    if groundtruth:
        plan.layers["groundtruth"] = groundtruth

    # ---- misalign on purpose (demo / aligner testing), then align
    if config.misalign.enabled:
        from exaconnect.services.perturb import create_misalign_tasks

        m = config.misalign
        options = {"max_translation": m.max_translation, "max_rotation_degrees": m.max_rotation_degrees,
                   "max_elastic": m.max_elastic, "blank_sections": list(m.blank_sections)}
        misaligned = layer("misaligned")
        misaligned_gt = layer("misaligned_groundtruth") if groundtruth else None
        stages.append(Stage("misalign", "align",
                            lambda src=image, labels=groundtruth: create_misalign_tasks(src, misaligned, options, m.seed,
                                                                                       labels, misaligned_gt),
                            image_requires + gt_requires, reads=(image,) + ((groundtruth,) if groundtruth else ()),
                            writes=(misaligned,) + ((misaligned_gt,) if misaligned_gt else ()),
                            parameters={"options": options, "seed": m.seed}, description="misalign on purpose"))
        image, image_requires = misaligned, ("misalign",)
        plan.layers["misaligned"] = misaligned
        if groundtruth:
            groundtruth, gt_requires = misaligned_gt, ("misalign",)
    if config.align.enabled:
        from exaconnect.services.align import align_stages, create_align_apply_tasks

        aligned = layer("aligned")
        align_config = _align_config(image, dict(config.align.set))
        stages.extend(align_stages(image, aligned, align_config, requires=image_requires))
        plan.alignment_layer = aligned
        if groundtruth:
            gt_in, aligned_gt = groundtruth, layer("aligned_groundtruth")
            stages.append(Stage("align.apply-groundtruth", "align",
                                lambda: create_align_apply_tasks(gt_in, aligned_gt, aligned, order=0),
                                ("align.compose",) + gt_requires, reads=(gt_in, aligned), writes=(aligned_gt,),
                                parameters={"src": gt_in, "alignment": aligned}, description="labels through the alignment"))
            groundtruth, gt_requires = aligned_gt, ("align.apply-groundtruth",)
            plan.layers["groundtruth"] = groundtruth
        image, image_requires = aligned, ("align.render",)
        plan.layers["aligned"] = aligned

    # ---- image pyramid (of what is segmented and viewed)
    stages.append(downsample_stage(image, "pyramid.image", image_requires, num_mips=config.pyramid.num_mips,
                                   factor=config.pyramid.factor))

    # ---- segmentation
    segmentation = None
    if config.segment.enabled:
        seg = config.segment
        model, model_requires = seg.model, ()
        if model == "demo":
            model, model_requires = _demo_model_stage(config, output, stages)
        passes = tuple(PassSpec(p.name, p.model or model, {**dict(seg.inference), **dict(p.inference)}, p.seed_order,
                                p.consensus_with, p.consensus_min_size) for p in seg.passes)
        segmentation = layer("segmentation")
        segment_plan = SegmentPlan(image, segmentation, passes, seg.subvolume, seg.overlap,
                                   Box.from_list(list(seg.bbox)) if seg.bbox else None, None,
                                   MatchOptions(seg.min_overlap_voxels, seg.min_fraction),
                                   downsample_mips=config.pyramid.num_mips, overwrite=True)
        stages.extend(segment_stages(segment_plan, requires=image_requires + model_requires))
        plan.layers["segmentation"] = segmentation
        seg_requires = ("segment.pyramid",) if config.pyramid.num_mips > 0 else ("segment.relabel",)
        if config.mesh.enabled:
            stages.extend(mesh_stages(segmentation, seg_requires, shape=config.mesh.shape,
                                      simplification_error=config.mesh.simplification_error))
        if config.skeletons.enabled:
            k = config.skeletons
            stages.extend(skeleton_stages(segmentation, seg_requires, shape=k.shape, scale=k.scale, const=k.const,
                                          dust_threshold=k.dust_threshold))
        if config.evaluate.enabled and groundtruth:
            from exaconnect.services.evaluate import evaluate_stage

            plan.scores_key = "evaluate/segmentation.json"
            stages.append(evaluate_stage(segmentation, groundtruth, f"{output}/pipeline", plan.scores_key,
                                         seg_requires + gt_requires,
                                         Box.from_list(list(seg.bbox)) if seg.bbox else None))
    return plan


def _align_config(image: str, sets: dict):
    """AlignConfig defaults for the section size of `image` (read when the stage starts; the
    layer may not exist yet at planning time), with `align.set` overrides validated now."""
    from exaconnect.align.match import AlignConfig

    sections = {}
    for key, value in sets.items():
        section, dot, option = key.partition(".")
        if not dot:
            sections.setdefault("", {})[key] = value
        else:
            sections.setdefault(section, {})[option] = value
    data = AlignConfig().as_dict()
    for section, values in sections.items():
        target = data if section == "" else data.get(section)
        if not isinstance(target, dict):
            raise InputError(f"align.set {section}: unknown section; expected one of "
                             f"{[k for k, v in data.items() if isinstance(v, dict)]}")
        for option, value in values.items():
            if option not in target:
                raise InputError(f"align.set {section + '.' if section else ''}{option}: unknown option; "
                                 f"{section or 'align'} takes {sorted(target)}")
    return _LazyAlignConfig(image, sections)


class _LazyAlignConfig:
    """Resolves to `config_for_shape(section size)` plus overrides once the layer exists."""

    def __init__(self, image: str, sections: dict) -> None:
        self.image, self.sections = image, sections

    def resolve(self):
        from exaconnect.align.match import AlignConfig, config_for_shape
        from exaconnect.precomputed.layers import layer_bounds, open_layer

        width, height, _ = layer_bounds(open_layer(self.image)).shape
        data = config_for_shape((height, width)).as_dict()
        for section, values in self.sections.items():
            (data if section == "" else data[section]).update(values)
        return AlignConfig.from_dict(data)

    def as_dict(self) -> dict:
        return {"image": self.image, "overrides": self.sections}


def _demo_model_stage(config: PipelineConfig, output: str, stages: list) -> tuple[str, tuple[str, ...]]:
    from exaconnect.ffn.training.demo import demo_config
    from exaconnect.precomputed.layers import local_path
    from exaconnect.services.stages import Stage
    from exaconnect.services.train import TrainTask

    root = local_path(output)
    if root is None:
        raise InputError("segment.model demo: the demo model is trained into a local output folder")
    out_dir = os.path.join(root, "ffn")
    # A fixed number of steps and no time limit: every machine trains the same model.
    from exaconnect.ffn.training.demo import DEMO_STEPS

    steps = config.segment.demo_model_steps or DEMO_STEPS
    data = demo_config(out_dir, seed=config.source.synthetic_seed, max_steps=steps)
    stages.append(Stage("train.demo-model", "train", lambda: [TrainTask(json.dumps(data), "demo-model")], (),
                        writes=(out_dir,), parameters={"config": data}, lease_seconds=3600,
                        description="the small demo FFN, a fixed number of steps"))
    from exaconnect.ffn.training.loop import MODEL_DIR

    return os.path.join(out_dir, MODEL_DIR), ("train.demo-model",)


def run_pipeline(config: PipelineConfig, progress: bool = True, stall_seconds: float | None = None,
                 **runner_options) -> dict:
    """Run (or resume) the whole pipeline; returns a summary with layers, stage timings,
    scores and links (also written to OUTPUT/pipeline/summary.json)."""
    from exaconnect.precomputed.store import ArtifactStore
    from exaconnect.services.runner import RunnerOptions, run_stages

    plan = build_plan(config)
    record = f"{plan.output}/pipeline"
    store = ArtifactStore(record)
    store.put_json("config.json", to_mapping(config))
    options = RunnerOptions(queue_root=_queue_root(config), record=record, workers=config.workers,
                            progress=progress, stall_seconds=stall_seconds, **runner_options)

    def after(stage, result):
        if result.status == "done" and stage.name in ("align.report",):
            _print_alignment(plan, progress)

    report = run_stages(plan.stages, options, on_complete=after)
    summary: dict = {"name": config.name, "layers": plan.layers, "stages": report.as_dict()}
    if plan.alignment_layer:
        summary["alignment"] = _alignment_figures(plan.alignment_layer)
    if plan.scores_key:
        summary["scores"] = store.get_json(plan.scores_key)
    summary["links"] = _links(plan, config)
    store.put_json("summary.json", summary)
    return summary


def _queue_root(config: PipelineConfig) -> str:
    root = config.queue_root
    return root if "://" in root else os.path.abspath(root)


def _alignment_figures(aligned: str) -> dict | None:
    from exaconnect.services.align import get_file

    raw = get_file(aligned, "align/report.json")
    if raw is None:
        return None
    report = json.loads(raw)
    return {k: v for k, v in report.items() if k != "per_section"}


def _print_alignment(plan: PipelinePlan, progress: bool) -> None:
    figures = _alignment_figures(plan.alignment_layer) if plan.alignment_layer else None
    if figures and progress:
        print(f"[run] alignment: neighbour correlation {figures.get('mean_correlation_before', float('nan')):.3f} -> "
              f"{figures.get('mean_correlation_after', float('nan')):.3f}, residual flow median "
              f"{figures.get('median_residual_flow_px', float('nan')):.2f} px, problem sections "
              f"{figures.get('problem_sections')}", flush=True)


def _links(plan: PipelinePlan, config: PipelineConfig) -> dict:
    from exaconnect.viewer import links

    layers = [plan.layers[k] for k in ("image", "aligned", "segmentation", "groundtruth") if k in plan.layers]
    layers = list(dict.fromkeys(layers))
    if not config.link.short:
        return {"long": links.link(layers, server=config.link.server)}
    # The state is saved as JSON beside the data (OUTPUT/states/NAME.json), which `exaconnect
    # view` serves: the short link carries only that file's URL.
    short = links.short_link(layers, name=config.name, server=config.link.server)
    return {"short": short.url, "state": short.state_location, "long": short.long_url}


def print_summary(summary: dict) -> None:
    stages = summary["stages"]
    ran = sum(1 for s in stages.values() if s["status"] == "done")
    print(f"[run] {summary['name']}: {ran} stages ran, {len(stages) - ran} reused")
    if summary.get("alignment"):
        a = summary["alignment"]
        print(f"[run] alignment: neighbour correlation {a.get('mean_correlation_before', float('nan')):.3f} -> "
              f"{a.get('mean_correlation_after', float('nan')):.3f}; residual flow median "
              f"{a.get('median_residual_flow_px', float('nan')):.2f} px, p95 {a.get('p95_residual_flow_px', float('nan')):.2f} px; "
              f"problem sections {a.get('problem_sections')}")
    if summary.get("scores"):
        s = summary["scores"]
        print(f"[run] segmentation vs ground truth: VI {s['vi']:.3f} (split {s['vi_split']:.3f}, merge {s['vi_merge']:.3f}), "
              f"adapted Rand error {s['adapted_rand_error']:.3f}")
    print("[run] layers:", *summary["layers"].values(), sep="\n  ")
    print("[run] open the link while `exaconnect view` serves the local layers (make view):")
    print(summary["links"].get("short") or summary["links"]["long"])


def read_plan_status(config: PipelineConfig) -> dict:
    """Which stages of the plan are complete (for `exaconnect run --status`)."""
    from exaconnect.services.runner import stage_records

    plan = build_plan(config)
    done = stage_records(f"{plan.output}/pipeline")
    return {s.name: ("done" if s.name in done else "pending") for s in plan.stages}


def default_pipeline_file() -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
