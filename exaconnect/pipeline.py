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
    montage_layer: str | None = None


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
    """Every stage of the run: each section of the pipeline file, ours and a lab's
    (`PipelineSection`), plans its stages in order on a shared context that carries the layers
    made so far and the stage producing each. Nothing is written here except the synthetic
    sample's source files."""
    from exaconnect.services.stages import PlanContext, plugin_sections

    context = PlanContext(_output_url(config))
    sections: list[tuple[float, str, object, object]] = [
        (order, key, plan, config) for order, key, plan in BUILTIN_SECTIONS]
    for key, section in plugin_sections().items():
        sections.append((section.order, key, section.plan, config.plugins.get(key)))
    for order, key, plan, section_config in sorted(sections, key=lambda item: item[0]):
        if section_config is None:
            continue
        if getattr(section_config, "enabled", True) is False:
            continue
        plan(section_config, context)
    plan = PipelinePlan(config, context.output, context.stages, dict(context.layers))
    plan.montage_layer = context.extras.get("montage_layer")
    plan.scores_key = context.extras.get("scores_key")
    plan.alignment_layer = context.extras.get("alignment_layer")
    return plan


def _existing_layer(source: str) -> str | None:
    """`precomputed://PATH_OR_URL`: an existing layer, by its one normalised name."""
    from exaconnect.precomputed.layers import layer_url

    return layer_url(source[len(LAYER_PREFIX):]) if source.startswith(LAYER_PREFIX) else None


def _plan_source(config: PipelineConfig, context) -> None:
    """The image (and ground-truth labels, if any) ingested, or existing layers taken as they are."""
    from exaconnect.services.ingest import IngestOptions, IngestStage

    source = config.source
    image_src, labels_src = source.image, source.groundtruth
    # With a tile manifest the image comes from the tiles: the built-in sample (source.image's
    # default) must not be made, nor its labels taken as the tiles' ground truth.
    if image_src == "synthetic" and not source.tiles:
        image_src, synthetic_labels = _synthetic_source(config, context.output)
        labels_src = labels_src or synthetic_labels
    tiles = _tile_manifest(config, context.output, image_src)
    if tiles is not None:
        _plan_montage(config, context, tiles)
    elif (existing := _existing_layer(image_src)) is not None:
        context.publish("image", existing, None)
    else:
        options = IngestOptions("image", source.resolution, config.ingest.voxel_offset, config.ingest.chunk_size,
                                config.ingest.encoding, overwrite=True)
        stage = IngestStage(src=image_src, dest=context.layer("image"), options=options, name="ingest.image")
        context.add(stage)
        context.publish("image", stage.dest, stage)
    if labels_src:
        if (existing := _existing_layer(labels_src)) is not None:
            context.publish("groundtruth", existing, None)
        else:
            options = IngestOptions("segmentation", source.resolution, config.ingest.voxel_offset,
                                    config.ingest.chunk_size, overwrite=True)
            stage = IngestStage(src=labels_src, dest=context.layer("groundtruth"), options=options,
                                name="ingest.groundtruth")
            context.add(stage)
            context.publish("groundtruth", stage.dest, stage)


def _tile_manifest(config: PipelineConfig, output: str, image_src: str) -> str | None:
    """The tile manifest to stitch: source.tiles, or with `montage.enabled` the built-in sample cut
    into tiles (written once, beside the output); None: whole sections are ingested."""
    import numpy as np

    from exaconnect.precomputed.layers import local_path
    from exaconnect.services.montage import write_synthetic_tiles

    if config.source.tiles:
        return os.path.abspath(config.source.tiles) if "://" not in config.source.tiles else config.source.tiles
    if not config.montage.enabled:
        return None
    if config.source.image != "synthetic":
        raise InputError("montage.enabled cuts the built-in sample into tiles (source.image: synthetic); for your own "
                         "tiles give source.tiles: TILES.csv (or a render-ws tile-spec JSON)")
    m = config.montage
    x, y, _ = config.source.synthetic_shape
    if m.tile_size > min(x, y):
        raise InputError(f"montage.tile_size {m.tile_size}: the built-in sample's sections are {x} x {y} px; expected "
                         f"tiles no larger than {min(x, y)} px (set montage.tile_size and montage.overlap)")
    return write_synthetic_tiles(np.load(image_src), os.path.join(local_path(output), "tiles"), m.tile_size, m.overlap,
                                 m.stage_error_px, config.source.synthetic_seed)


def _plan_montage(config: PipelineConfig, context, tiles: str) -> None:
    """Each section's tiles stitched into the image layer: match, solve, render, report, outlines."""
    from exaconnect.services.montage import ManifestRules, montage_config, montage_stages

    stages = montage_stages(tiles, context.layer("image"), config.source.resolution,
                            montage_config(dict(config.montage.set)),
                            ManifestRules(skip_missing_tiles=config.montage.skip_missing_tiles),
                            chunk_size=config.ingest.chunk_size, encoding=config.ingest.encoding)
    context.add(*stages)
    render = next(s for s in stages if s.name == "montage.render")
    context.publish("image", context.layer("image"), render)
    context.extras["montage_layer"] = context.layer("image")


def _plan_misalign(config: PipelineConfig, context) -> None:
    """The stack misaligned on purpose (the demo; testing an aligner), its labels moved with it."""
    from exaconnect.services.misalign import MisalignStage

    m = config.misalign
    options = {"max_translation": m.max_translation, "max_rotation_degrees": m.max_rotation_degrees,
               "max_elastic": m.max_elastic, "blank_sections": list(m.blank_sections)}
    has_labels = "groundtruth" in context.layers
    stage = MisalignStage(src=context.layers["image"], dest=context.layer("misaligned"), options=options, seed=m.seed,
                          labels_src=context.layers.get("groundtruth"),
                          labels_dest=context.layer("misaligned_groundtruth") if has_labels else None,
                          upstream=context.requires("image", "groundtruth"))
    context.add(stage)
    context.publish("image", stage.dest, stage)
    context.layers["misaligned"] = stage.dest
    if has_labels:
        context.publish("groundtruth", stage.labels_dest, stage)


def _plan_align(config: PipelineConfig, context) -> None:
    """The stack aligned (flow, spring meshes, compose, render, report); labels through the same."""
    from exaconnect.services.align import AlignApply, align_stages

    aligned = context.layer("aligned")
    steps = align_stages(context.layers["image"], aligned, _align_config(context.layers["image"], dict(config.align.set)),
                         upstream=context.requires("image"))
    context.add(*steps)
    compose = next(s for s in steps if s.step == "compose")
    render = next(s for s in steps if s.step == "render")
    context.extras["alignment_layer"] = aligned
    if "groundtruth" in context.layers:
        apply = AlignApply(src=context.layers["groundtruth"], dest=context.layer("aligned_groundtruth"), alignment=aligned,
                           order=0, upstream=(compose,) + context.requires("groundtruth"),
                           name="align.apply-groundtruth")
        context.add(apply)
        context.publish("groundtruth", apply.dest, apply)
    context.publish("image", aligned, render)
    context.layers["aligned"] = aligned


def _plan_pyramid(config: PipelineConfig, context) -> None:
    """The image pyramid of what is segmented and viewed."""
    from exaconnect.services.downsample import DownsampleStage

    stage = DownsampleStage(layer=context.layers["image"], num_mips=config.pyramid.num_mips,
                            factor=config.pyramid.factor, upstream=context.requires("image"), name="pyramid.image")
    context.add(stage)
    # What reads the image afterwards needs its mip 0 only: the pyramid is not a requirement.


def _plan_segment(config: PipelineConfig, context) -> None:
    """FFN passes over the volume, stitched into one segmentation layer (and its pyramid)."""
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.stitching import MatchOptions
    from exaconnect.services.segment_stages import SegmentPlan, segment_stages
    from exaconnect.services.segment_staging import PassSpec

    seg = config.segment
    model, model_stages = seg.model, ()
    if model == "demo":
        model, model_stages = _demo_model_stage(config, context.output)
        context.add(*model_stages)
    passes = tuple(PassSpec(p.name, p.model or model, {**dict(seg.inference), **dict(p.inference)}, p.seed_order,
                            p.consensus_with, p.consensus_min_size) for p in seg.passes)
    segmentation = context.layer("segmentation")
    segment_plan = SegmentPlan(context.layers["image"], segmentation, passes, seg.subvolume, seg.overlap,
                               Box.from_list(list(seg.bbox)) if seg.bbox else None, None,
                               MatchOptions(seg.min_overlap_voxels, seg.min_fraction),
                               downsample_mips=config.pyramid.num_mips, overwrite=True)
    stages = segment_stages(segment_plan, upstream=context.requires("image") + model_stages)
    context.add(*stages)
    # What reads the segmentation (meshes at lower mips, skeletons, scores) waits for its pyramid.
    context.publish("segmentation", segmentation, stages[-1])


def _plan_mesh(config: PipelineConfig, context) -> None:
    from exaconnect.services.mesh import MeshForge, mesh_stages

    if "segmentation" not in context.layers:
        return
    context.add(*mesh_stages(MeshForge(layer=context.layers["segmentation"], shape=config.mesh.shape,
                                       simplification_error=config.mesh.simplification_error,
                                       upstream=context.requires("segmentation"))))


def _plan_skeletons(config: PipelineConfig, context) -> None:
    from exaconnect.services.skeleton import SkeletonForge, skeleton_stages

    if "segmentation" not in context.layers:
        return
    k = config.skeletons
    context.add(*skeleton_stages(SkeletonForge(layer=context.layers["segmentation"], shape=k.shape, scale=k.scale,
                                               const=k.const, dust_threshold=k.dust_threshold,
                                               upstream=context.requires("segmentation"))))


def _plan_evaluate(config: PipelineConfig, context) -> None:
    from exaconnect.precomputed.bbox import Box
    from exaconnect.services.evaluate import EvaluateStage

    if "segmentation" not in context.layers or "groundtruth" not in context.layers:
        return
    key = "evaluate/segmentation.json"
    context.extras["scores_key"] = key
    bbox = config.segment.bbox
    e = config.evaluate
    kimimaro = ({"scale": e.kimimaro_scale, "const": e.kimimaro_const, "dust_threshold": e.kimimaro_dust_threshold,
                 "anisotropy": list(config.source.resolution)} if e.skeleton_metrics else None)
    context.add(EvaluateStage(segmentation=context.layers["segmentation"], groundtruth=context.layers["groundtruth"],
                              store=f"{context.output}/pipeline", key=key,
                              bbox=Box.from_list(list(bbox)) if bbox else None, kimimaro=kimimaro,
                              merge_min_nodes=e.merge_min_nodes,
                              # What any segmentation of this image has to beat: an empty one, a watershed.
                              image=context.layers.get("image"),
                              upstream=context.requires("segmentation", "groundtruth", "image")))


def _section(key: str, plan):
    """A built-in section's planner, called with the whole config (the sections read each other's
    options: the pyramid's mips are the segmentation's too) when `config.KEY.enabled` allows."""

    def planner(config: PipelineConfig, context) -> None:
        if getattr(getattr(config, key), "enabled", True):
            plan(config, context)

    return planner


# (order, section key, planner): a lab's sections (`PipelineSection.order`) fall between these.
BUILTIN_SECTIONS = (
    (10, "source", _section("source", _plan_source)),
    (20, "misalign", _section("misalign", _plan_misalign)),
    (30, "align", _section("align", _plan_align)),
    (40, "pyramid", _section("pyramid", _plan_pyramid)),
    (50, "segment", _section("segment", _plan_segment)),
    (60, "mesh", _section("mesh", _plan_mesh)),
    (70, "skeletons", _section("skeletons", _plan_skeletons)),
    (80, "evaluate", _section("evaluate", _plan_evaluate)),
)


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


def _model_dir() -> str:
    from exaconnect.ffn.training.loop import MODEL_DIR

    return MODEL_DIR


def _demo_model_stage(config: PipelineConfig, output: str) -> tuple[str, tuple]:
    """The demo FFN's path and the stages that make it: the model kept in the repository
    (ffn/demo_model, checked against its SHA-256, copied once into OUTPUT/ffn/demo-model-DIGEST
    where every worker reads it; nothing to train), or with `segment.demo_model_steps` a demo
    model trained in the run into OUTPUT/ffn for that many steps."""
    from exaconnect.ffn.training.demo import committed_demo_model, demo_config, install_demo_model
    from exaconnect.precomputed.layers import local_path
    from exaconnect.services.train import TrainDemoModel

    root = local_path(output)
    steps = config.segment.demo_model_steps
    if steps is None:
        if root is None:
            return str(committed_demo_model()[0]), ()
        return str(install_demo_model(os.path.join(root, "ffn"))), ()
    if root is None:
        raise InputError("segment.demo_model_steps: the demo model is trained into a local output folder")
    out_dir = os.path.join(root, "ffn")
    stage = TrainDemoModel(config=demo_config(out_dir, seed=config.source.synthetic_seed, max_steps=steps),
                           out_dir=out_dir)
    return os.path.join(out_dir, _model_dir()), (stage,)


def run_pipeline(config: PipelineConfig, progress: bool = True, stall_seconds: float | None = None,
                 **runner_options) -> dict:
    """Run (or resume) the whole pipeline; returns a summary with layers, stage timings,
    scores and links (also written to OUTPUT/pipeline/summary.json)."""
    from exaconnect.precomputed.store import ArtifactStore
    from exaconnect.services.runner import RunnerOptions, run_stages

    plan = build_plan(config)
    store = ArtifactStore(f"{plan.output}/pipeline")  # the run's config, scores and summary
    store.put_json("config.json", to_mapping(config))
    options = RunnerOptions(queue_root=_queue_root(config), record=run_records(config, plan), workers=config.workers,
                            progress=progress, stall_seconds=stall_seconds, **runner_options)

    def after(stage, result):
        if result.status == "done" and stage.name == "montage.report" and progress:
            _print_montage(_montage_figures(plan))
        if result.status == "done" and stage.name in ("align.report",):
            _print_alignment(plan, progress)

    report = run_stages(plan.stages, options, on_complete=after)
    summary: dict = {"name": config.name, "layers": plan.layers, "stages": report.as_dict()}
    if plan.montage_layer:
        summary["montage"] = _montage_figures(plan)
    if plan.alignment_layer:
        summary["alignment"] = _alignment_figures(plan.alignment_layer)
    if plan.scores_key:
        summary["scores"] = store.get_json(plan.scores_key)
    summary["links"] = _links(plan, config)
    store.put_json("summary.json", summary)
    return summary


def run_records(config: PipelineConfig, plan: PipelinePlan) -> str:
    """The stage records of this run: beside its queues (QUEUE_ROOT/records), where the stage
    verbs (`segment run --queue ROOT`, ...) keep theirs, so either resumes the other's work."""
    from exaconnect.services.stages import records_location

    return records_location(_queue_root(config), fallback=f"{plan.output}/pipeline")


def _queue_root(config: PipelineConfig) -> str:
    root = config.queue_root
    return root if "://" in root else os.path.abspath(root)


def _montage_figures(plan: PipelinePlan) -> dict:
    from exaconnect.services.montage import montage_summary

    return montage_summary(plan.montage_layer) if plan.montage_layer else {}


def _print_montage(m: dict) -> None:
    if not m:
        return
    residual = ("n/a" if m.get("seam_residual_median_px") is None else
                f"median {m['seam_residual_median_px']:.2f} px, max {m['seam_residual_max_px']:.2f} px")
    print(f"[run] montage: {m['tiles_placed']}/{m['tiles']} tiles placed in {m['sections']} sections "
          f"({m['tiles_not_placed']} only at their stage position, {m['tiles_skipped']} skipped); pairs used "
          f"{m['pairs_used']}, rejected {m['pairs_rejected']}, untrusted {m['pairs_untrusted']}; seam residual {residual}",
          flush=True)


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
    if plan.montage_layer:
        from exaconnect.services.montage import outlines_url

        # The stitched sections (before any alignment) and, over them, where each tile went.
        layers += [plan.montage_layer, outlines_url(plan.montage_layer)]
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
    if summary.get("montage"):
        _print_montage(summary["montage"])
    if summary.get("alignment"):
        a = summary["alignment"]
        print(f"[run] alignment: neighbour correlation {a.get('mean_correlation_before', float('nan')):.3f} -> "
              f"{a.get('mean_correlation_after', float('nan')):.3f}; residual flow median "
              f"{a.get('median_residual_flow_px', float('nan')):.2f} px, p95 {a.get('p95_residual_flow_px', float('nan')):.2f} px; "
              f"problem sections {a.get('problem_sections')}")
    if summary.get("scores"):
        from exaconnect.precomputed.evaluate_report import baseline_lines, voxel_scores

        s = summary["scores"]
        print(f"[run] segmentation vs ground truth: {voxel_scores(s)}")
        for line in baseline_lines(s):
            print(f"[run] {line}")
        if "erl" in s:
            print(f"[run] skeletons: expected run length {s['erl'] / 1000:.3f} um of {s['erl_max'] / 1000:.3f} um possible, "
                  f"{s['skeleton_merging_segments']} merging segments, {s['skeleton_omitted_length_fraction']:.0%} "
                  "of the skeleton length unsegmented")
    # Names, since several can name one layer (the published segmentation is also its last pass's).
    width = max((len(name) for name in summary["layers"]), default=0)
    print("[run] layers:", *(f"{name:<{width}}  {url}" for name, url in summary["layers"].items()), sep="\n  ")
    print("[run] open the link while `exaconnect view` serves the local layers (make view):")
    print(summary["links"].get("short") or summary["links"]["long"])


def read_plan_status(config: PipelineConfig) -> dict:
    """Which stages of the plan are complete (for `exaconnect run --status`)."""
    from exaconnect.services.runner import stage_records

    plan = build_plan(config)
    done = stage_records(run_records(config, plan))
    return {s.name: ("done" if s.name in done else "pending") for s in plan.stages}


def default_pipeline_file() -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
