"""The pipeline file (`exaconnect run PIPELINE.yaml`): frozen dataclasses, one per section,
loaded strictly. An unknown or mistyped key is an error that names it and lists the keys that
section takes; `configs/pipeline.yaml` shows and explains every option.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from exaconnect.errors import InputError
from exaconnect.precomputed.config_loader import load_dataclass, merged_mapping, plain

Triple = tuple[int, int, int]


def _check_sizes(where: str, values: Any, what: str = "three sizes > 0 (x, y, z voxels)", minimum: int = 1) -> None:
    """A triple of whole numbers of at least `minimum`, or an InputError naming the key."""
    values = list(values)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
        raise InputError(f"{where} {values}: expected {what}")


@dataclass(frozen=True)
class SourceConfig:
    # Sections to ingest (a folder of PNG/TIFF, a multi-page TIFF, file.h5:dataset, .npy),
    # `precomputed://URL` for an existing image layer, or `synthetic` for the built-in sample.
    image: str = "synthetic"
    # Labels for evaluation (same forms); with `synthetic`, the sample's own labels are used.
    groundtruth: str | None = None
    resolution: tuple[float, float, float] = (10.0, 10.0, 10.0)
    synthetic_shape: Triple = (96, 96, 96)  # x, y, z
    synthetic_seed: int = 0
    # A tile manifest instead of whole sections: a CSV `z,path,x,y` or a render-ws tile-spec JSON.
    # Each section's tiles are stitched (the montage section's options) into the image layer.
    tiles: str | None = None

    def __post_init__(self) -> None:
        if len(self.resolution) != 3 or not all(math.isfinite(r) and r > 0 for r in self.resolution):
            raise InputError(f"source.resolution {list(self.resolution)}: expected three finite numbers > 0 (nm)")
        if min(self.synthetic_shape) < 16:
            raise InputError(f"source.synthetic_shape {list(self.synthetic_shape)}: expected at least 16 voxels per axis")


@dataclass(frozen=True)
class MontageSectionConfig:
    """Stitching the tiles of each section (source.tiles, or with `enabled` and source.image
    `synthetic`: the built-in sample cut into overlapping tiles with wrong stage positions and
    per-tile brightness, then stitched back: the demo of this step)."""

    enabled: bool = False
    tile_size: int = 56  # synthetic tiles: side in pixels
    overlap: int = 16  # synthetic tiles: pixels shared by neighbours
    stage_error_px: float = 8.0  # synthetic tiles: recorded stage positions wrong by up to this
    skip_missing_tiles: bool = False  # leave out (and report) tiles whose files are missing
    # Montage options as `section.option: value` (sections match, solve, intensity), e.g.
    # `match.search_px: 80`.
    set: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tile_size < 16 or not 0 <= self.overlap < self.tile_size // 2:
            raise InputError(f"montage.tile_size {self.tile_size} / overlap {self.overlap}: expected tiles of at "
                             "least 16 px overlapping by less than half their size")
        if self.stage_error_px < 0:
            raise InputError(f"montage.stage_error_px {self.stage_error_px}: expected >= 0")


@dataclass(frozen=True)
class IngestConfig:
    chunk_size: Triple = (64, 64, 64)
    encoding: str | None = None  # raw|jpeg (images); compressed_segmentation|compresso (labels)
    voxel_offset: Triple = (0, 0, 0)

    def __post_init__(self) -> None:
        _check_sizes("ingest.chunk_size", self.chunk_size)


@dataclass(frozen=True)
class MisalignConfig:
    """Misalign the ingested stack on purpose, with the truth recorded (the demo, and testing an
    aligner on a stack of your own). The labels, if any, are moved with it."""

    enabled: bool = False
    seed: int = 0
    max_translation: float = 6.0  # px per axis
    max_rotation_degrees: float = 0.5
    max_elastic: float = 1.5  # px
    blank_sections: tuple[int, ...] = ()


@dataclass(frozen=True)
class AlignStageConfig:
    enabled: bool = False
    # AlignConfig overrides as `section.option: value` (e.g. `flow.patch_size: 48`); defaults
    # are scaled to the section size.
    set: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassConfig:
    name: str = "initial"
    model: str | None = None  # default: segment.model
    seed_order: str = "forward"
    consensus_with: str | None = None
    consensus_min_size: int = 0
    inference: Mapping[str, Any] = field(default_factory=dict)  # per-pass InferenceOptions overrides

    def __post_init__(self) -> None:
        if not str(self.name).replace("-", "").replace("_", "").isalnum():
            raise InputError(f"segment.passes name {self.name!r}: expected letters, digits, '-' or '_'")


@dataclass(frozen=True)
class SegmentConfig:
    enabled: bool = True
    # An FFN checkpoint (ours, or a google/ffn TF1 prefix), or `demo` to train the small demo FFN
    # on other synthetic samples (a fixed number of steps, so every machine gets the same model).
    model: str = "demo"
    subvolume: Triple = (256, 256, 256)  # a multiple of the chunk size
    overlap: Triple = (32, 32, 32)
    bbox: tuple[int, ...] | None = None  # x0,y0,z0,x1,y1,z1; default the whole layer
    inference: Mapping[str, Any] = field(default_factory=dict)  # InferenceOptions overrides for every pass
    passes: tuple[PassConfig, ...] = (PassConfig(),)
    min_overlap_voxels: int = 100
    min_fraction: float = 0.5
    demo_model_steps: int | None = None  # None: the demo FFN kept in the repository (ffn/demo_model); N: train one in the run, N steps

    def __post_init__(self) -> None:
        _check_sizes("segment.subvolume", self.subvolume,
                     "three sizes > 0 (x, y, z voxels per FFN task, a multiple of the chunk size)")
        _check_sizes("segment.overlap", self.overlap, "three margins >= 0 (x, y, z voxels)", minimum=0)
        if self.bbox is not None:
            box = list(self.bbox)
            if len(box) != 6 or not all(isinstance(v, int) for v in box) or \
                    not all(box[i] < box[i + 3] for i in range(3)):
                raise InputError(f"segment.bbox {box}: expected x0,y0,z0,x1,y1,z1 with each start below its stop")
        if self.demo_model_steps is not None and self.demo_model_steps < 1:
            raise InputError(f"segment.demo_model_steps {self.demo_model_steps}: expected at least 1")


@dataclass(frozen=True)
class PyramidConfig:
    num_mips: int = 2
    factor: Triple = (2, 2, 2)

    def __post_init__(self) -> None:
        if self.num_mips < 0:
            raise InputError(f"pyramid.num_mips {self.num_mips}: expected 0 or more")
        _check_sizes("pyramid.factor", self.factor, "three downsampling factors >= 1 (x, y, z)")


@dataclass(frozen=True)
class MeshConfig:
    enabled: bool = True
    shape: Triple = (256, 256, 256)
    simplification_error: float = 40.0

    def __post_init__(self) -> None:
        _check_sizes("mesh.shape", self.shape, "three sizes > 0 (x, y, z voxels per mesh task)")


@dataclass(frozen=True)
class SkeletonConfig:
    enabled: bool = True
    shape: Triple = (256, 256, 256)
    scale: float = 4.0
    const: float = 100.0
    dust_threshold: int = 500

    def __post_init__(self) -> None:
        _check_sizes("skeletons.shape", self.shape, "three sizes > 0 (x, y, z voxels per skeleton task)")
        if self.dust_threshold < 0:
            raise InputError(f"skeletons.dust_threshold {self.dust_threshold}: expected 0 or more voxels")


@dataclass(frozen=True)
class EvaluateConfig:
    enabled: bool = True  # only when there is ground truth
    # Expected run length and merging segments against kimimaro skeletons of the ground truth
    # (TEASAR: invalidation radius scale * boundary distance + const nm; bodies under
    # dust_threshold voxels get none). merge_min_nodes > 1: the lenient merge rule.
    skeleton_metrics: bool = True
    kimimaro_scale: float = 1.5
    kimimaro_const: float = 300.0
    kimimaro_dust_threshold: int = 100
    merge_min_nodes: int = 1


@dataclass(frozen=True)
class LinkConfig:
    short: bool = True  # also write the state JSON and print a short #! link to it
    server: str = "http://127.0.0.1:8765"  # where `exaconnect view` serves local layers


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "pipeline"
    output: str = "data/pipeline"  # layers, run records and reports
    queue_root: str = "queues/pipeline"  # one queue per service below it (a shared folder on a cluster)
    workers: int = 2  # local worker processes per stage; 0: remote workers drain, the runner waits
    source: SourceConfig = SourceConfig()
    montage: MontageSectionConfig = MontageSectionConfig()
    ingest: IngestConfig = IngestConfig()
    misalign: MisalignConfig = MisalignConfig()
    align: AlignStageConfig = AlignStageConfig()
    segment: SegmentConfig = SegmentConfig()
    pyramid: PyramidConfig = PyramidConfig()
    mesh: MeshConfig = MeshConfig()
    skeletons: SkeletonConfig = SkeletonConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    link: LinkConfig = LinkConfig()
    # A lab's sections (`PipelineSection`s registered by its stage modules), by key, each loaded
    # by the same strict loader; in the file they sit at the top level beside ours.
    plugins: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise InputError(f"workers {self.workers}: expected 0 (remote workers) or more")
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"name {self.name!r}: expected letters, digits, '-' or '_'")


# ---------------------------------------------------------------- strict loading

def from_mapping(cls: type, data: Any, where: str = "pipeline") -> Any:
    """A config section from its mapping through the project's one strict loader; the pipeline
    itself also takes a lab's registered sections (`PipelineSection`) at its top level."""
    if cls is not PipelineConfig:
        return load_dataclass(cls, data, where)
    if data is not None and not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a mapping of sections, got {data!r}")
    ours, plugins = _plugin_sections(data or {}, where)
    names = [f.name for f in dataclasses.fields(PipelineConfig) if f.name != "plugins"]
    unknown = [k for k in ours if k not in names]
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown key; {where} takes {', '.join(names + sorted(plugins))}")
    config = load_dataclass(PipelineConfig, ours, where)
    return dataclasses.replace(config, plugins=plugins) if plugins else config


def _plugin_sections(data: Mapping[str, Any], where: str) -> tuple[dict, dict]:
    """The pipeline file's keys split into ours and a lab's registered sections (loaded strictly).
    A registered section left out of the file is planned with its defaults only if they enable it."""
    from exaconnect.services.stages import plugin_sections

    registered = plugin_sections()
    ours = {k: v for k, v in data.items() if k not in registered}
    theirs = {}
    for key, section in registered.items():
        theirs[key] = from_mapping(section.config, data.get(key), f"{where}.{key}")
    return ours, theirs


def apply_sets(data: dict, sets: Mapping[str, Mapping[str, Any]]) -> dict:
    """`--set section.key=value` overrides (already parsed) into the raw mapping; a top-level
    key is given as `pipeline.key`. A nested section is merged, not replaced: setting
    `refine.fill.sigma` keeps the file's `refine.fill.enabled`."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for section, values in sets.items():
        if section == "pipeline":
            out.update(values)
            continue
        current = out.get(section) or {}
        if not isinstance(current, Mapping):
            raise InputError(f"--set {section}.…: {section} is not a section")
        out[section] = merged_mapping(current, values)
    return out


def load_pipeline(path: str | Path, sets: Mapping[str, Mapping[str, Any]] | None = None) -> PipelineConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"pipeline file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"pipeline file {path}: not valid YAML ({exc})") from None
    if data is None:
        # Not the whole default pipeline: an empty file is a mistake far more often than a wish.
        raise InputError(f"pipeline file {path}: is empty; expected a mapping of sections (every option is "
                         "explained in configs/pipeline.yaml; `{}` asks for all the defaults)")
    if not isinstance(data, Mapping):
        raise InputError(f"pipeline file {path}: expected a mapping of sections at the top")
    try:
        return from_mapping(PipelineConfig, apply_sets(dict(data), sets or {}), where="pipeline")
    except InputError as exc:
        raise InputError(f"pipeline file {path}: {exc}") from None


def to_mapping(config: Any) -> Any:
    """The plain (YAML-ready) form of a config; a lab's sections sit at the top level beside ours."""
    if isinstance(config, PipelineConfig):
        ours = {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.name != "plugins"}
        return {**ours, **{key: plain(value) for key, value in config.plugins.items()}}
    return plain(config)
