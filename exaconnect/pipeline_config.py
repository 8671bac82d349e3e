"""The pipeline file (`exaconnect run PIPELINE.yaml`): frozen dataclasses, one per section,
loaded strictly. An unknown or mistyped key is an error that names it and lists the keys that
section takes; `configs/pipeline.yaml` shows and explains every option.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from exaconnect.errors import InputError

Triple = tuple[int, int, int]


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

    def __post_init__(self) -> None:
        if len(self.resolution) != 3 or not all(math.isfinite(r) and r > 0 for r in self.resolution):
            raise InputError(f"source.resolution {list(self.resolution)}: expected three finite numbers > 0 (nm)")
        if min(self.synthetic_shape) < 16:
            raise InputError(f"source.synthetic_shape {list(self.synthetic_shape)}: expected at least 16 voxels per axis")


@dataclass(frozen=True)
class IngestConfig:
    chunk_size: Triple = (64, 64, 64)
    encoding: str | None = None  # raw|jpeg (images); compressed_segmentation|compresso (labels)
    voxel_offset: Triple = (0, 0, 0)


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
    demo_model_steps: int | None = None  # None: the demo's own fixed number (ffn/training/demo.py DEMO_STEPS)


@dataclass(frozen=True)
class PyramidConfig:
    num_mips: int = 2
    factor: Triple = (2, 2, 2)


@dataclass(frozen=True)
class MeshConfig:
    enabled: bool = True
    shape: Triple = (256, 256, 256)
    simplification_error: float = 40.0


@dataclass(frozen=True)
class SkeletonConfig:
    enabled: bool = True
    shape: Triple = (256, 256, 256)
    scale: float = 4.0
    const: float = 100.0
    dust_threshold: int = 500


@dataclass(frozen=True)
class EvaluateConfig:
    enabled: bool = True  # only when there is ground truth


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
    ingest: IngestConfig = IngestConfig()
    misalign: MisalignConfig = MisalignConfig()
    align: AlignStageConfig = AlignStageConfig()
    segment: SegmentConfig = SegmentConfig()
    pyramid: PyramidConfig = PyramidConfig()
    mesh: MeshConfig = MeshConfig()
    skeletons: SkeletonConfig = SkeletonConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    link: LinkConfig = LinkConfig()

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise InputError(f"workers {self.workers}: expected 0 (remote workers) or more")
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"name {self.name!r}: expected letters, digits, '-' or '_'")


# ---------------------------------------------------------------- strict loading

def _convert(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: {value!r}; expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise InputError(f"{where}: {value!r}; expected {len(args)} values")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (Mapping, dict) or kind in (dict, Mapping) or origin is typing.Mapping:
        if not isinstance(value, Mapping):
            raise InputError(f"{where}: {value!r}; expected a mapping")
        return dict(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: {value!r}; expected true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: {value!r}; expected an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{where}: {value!r}; expected a finite number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: {value!r}; expected a string")
        return value
    return value


def from_mapping(cls: type, data: Any, where: str = "pipeline") -> Any:
    """`cls(**data)` with every key checked against the dataclass's fields, recursively."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown key; {where} takes {', '.join(names)}")
    values = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    if cls is PassConfig and "name" in values and not str(values["name"]).replace("-", "").replace("_", "").isalnum():
        raise InputError(f"{where}.name {values['name']!r}: expected letters, digits, '-' or '_'")
    try:
        return cls(**values)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from None


def apply_sets(data: dict, sets: Mapping[str, Mapping[str, Any]]) -> dict:
    """`--set section.key=value` overrides (already parsed) into the raw mapping; a top-level
    key is given as `pipeline.key`."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for section, values in sets.items():
        if section == "pipeline":
            out.update(values)
            continue
        current = out.get(section) or {}
        if not isinstance(current, Mapping):
            raise InputError(f"--set {section}.…: {section} is not a section")
        out[section] = {**current, **values}
    return out


def load_pipeline(path: str | Path, sets: Mapping[str, Mapping[str, Any]] | None = None) -> PipelineConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"pipeline file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"pipeline file {path}: not valid YAML ({exc})") from None
    if not isinstance(data, Mapping):
        raise InputError(f"pipeline file {path}: expected a mapping of sections at the top")
    try:
        return from_mapping(PipelineConfig, apply_sets(dict(data), sets or {}), where="pipeline")
    except InputError as exc:
        raise InputError(f"pipeline file {path}: {exc}") from None


def to_mapping(config: Any) -> Any:
    """The plain (YAML-ready) form of a config."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_mapping(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [to_mapping(v) for v in config]
    if isinstance(config, Mapping):
        return {k: to_mapping(v) for k, v in config.items()}
    return config
