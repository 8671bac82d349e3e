"""Configuration of FFN training: frozen dataclasses loaded from one YAML file.

Every option of `exaconnect train --config FILE.yaml` lives here, with its default and the
reason for it. Defaults follow the reference (google/ffn `train.py`, `compute_partitions.py`,
`optimizer.py`) unless a comment says otherwise. Geometry triples given by the user are
(x, y, z), as in `ModelConfig`; arrays are indexed (z, y, x).

A config file looks like::

    model: {depth: 4, fov_size: [17, 17, 17], deltas: [4, 4, 4], features: 16}
    data:
      volumes:
        - {name: train, image: data/fib25/image, labels: data/fib25/labels,
           bbox: [0, 0, 0, 250, 250, 125]}
    training: {batch_size: 4, max_steps: 10000, out_dir: runs/small}
    optimizer: {name: adam, learning_rate: 0.001}

Unknown keys are errors that name the key and its section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from exaconnect.errors import InputError
from exaconnect.precomputed.config_loader import merged_mapping

from ..config import InferenceOptions, ModelConfig, inference_options_from_dict, model_config_from_dict

OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop", "adagrad")
FOV_POLICIES = ("fixed", "max_pred")
STRATEGIES = ("default", "mirrored", "multi_worker")
DEVICES = ("auto", "cpu", "gpu", "xpu")

# compute_partitions.py sample invocation in the reference (fractions of same-label voxels).
DEFAULT_THRESHOLDS = (0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _number(section: str, name: str, value: Any, low: float | None = None, high: float | None = None,
            integer: bool = False, low_open: bool = False) -> Any:
    where = f"{section}.{name}={value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: expected a number")
    if integer and int(value) != value:
        raise InputError(f"{where}: expected an integer")
    if low is not None and (value <= low if low_open else value < low):
        raise InputError(f"{where}: expected a value {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise InputError(f"{where}: expected a value <= {high}")
    return int(value) if integer else float(value)


def _triple(section: str, name: str, value: Any, minimum: int = 0) -> tuple[int, int, int]:
    where = f"{section}.{name}={value!r}"
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise InputError(f"{where}: expected three integers (x, y, z)")
    return tuple(_number(section, name, v, low=minimum, integer=True) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class VolumeSource:
    """One training volume: an image and a label source over the same voxel grid.

    `image` and `labels` are precomputed layers (path or URL; read with cloud-volume) or any
    stack that `exaconnect ingest` accepts (a .npy file, `file.h5:dataset`, a folder of PNG/TIFF
    sections), or `synthetic:SEED` for the built-in sample. `bbox` is
    [x0, y0, z0, x1, y1, z1] in the layer's voxel coordinates (default: the whole volume);
    `resolution` (x, y, z) decides which axis permutations are valid augmentations (read from
    the layer when it is a layer). `partitions` optionally names a partition layer written by
    `exaconnect train-partition` queue tasks (same grid as `labels`); without it the partition
    volume is computed here and cached in `data.cache_dir`.
    """

    name: str
    image: str
    labels: str
    bbox: tuple[int, ...] | None = None
    resolution: tuple[float, float, float] | None = None
    partitions: str | None = None

    def __post_init__(self) -> None:
        where = f"data.volumes[{self.name}]"
        if not isinstance(self.name, str) or not self.name:
            raise InputError("data.volumes[].name: expected a non-empty string")
        if self.partitions is not None and (not isinstance(self.partitions, str) or not self.partitions):
            raise InputError(f"{where}.partitions: expected a partition layer path/URL")
        for key in ("image", "labels"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise InputError(f"{where}.{key}: expected a layer path/URL or stack path")
        if self.bbox is not None:
            box = tuple(self.bbox)
            if len(box) != 6 or any(isinstance(v, bool) or int(v) != v for v in box):
                raise InputError(f"{where}.bbox={self.bbox!r}: expected six integers x0,y0,z0,x1,y1,z1")
            if any(box[i] >= box[i + 3] for i in range(3)):
                raise InputError(f"{where}.bbox={self.bbox!r}: every x1,y1,z1 must exceed x0,y0,z0")
            object.__setattr__(self, "bbox", tuple(int(v) for v in box))
        if self.resolution is not None:
            res = tuple(_number(where, "resolution", v, low=0, low_open=True) for v in self.resolution)
            if len(res) != 3:
                raise InputError(f"{where}.resolution={self.resolution!r}: expected three numbers (x, y, z)")
            object.__setattr__(self, "resolution", res)


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how their centres are chosen."""

    volumes: tuple[VolumeSource, ...] = ()
    # Held-out volumes for the validation metric (FOV-level precision/recall/F1).
    validation_volumes: tuple[VolumeSource, ...] = ()
    # Local-object-mask radius (x, y, z) of the partition volume; None = fov//2 + deltas,
    # the context one FOV move can see.
    lom_radius: tuple[int, int, int] | None = None
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    # Objects smaller than this (voxels, counted inside the volume read) get no partition,
    # as the reference's clear_dust before partitioning.
    min_size: int = 10000
    # Where partitions and coordinate tables are cached (computed once per volume+settings);
    # None = <out_dir>/partitions.
    cache_dir: str | None = None
    image_mean: float = 128.0
    image_stddev: float = 33.0

    def __post_init__(self) -> None:
        if self.lom_radius is not None:
            object.__setattr__(self, "lom_radius", _triple("data", "lom_radius", self.lom_radius, 1))
        ths = tuple(_number("data", "thresholds", t, low=0.0, high=1.0) for t in self.thresholds)
        if not ths or any(b <= a for a, b in zip(ths, ths[1:])):
            raise InputError(f"data.thresholds={self.thresholds!r}: expected increasing fractions in [0, 1]")
        object.__setattr__(self, "thresholds", ths)
        _number("data", "min_size", self.min_size, low=0, integer=True)
        _number("data", "image_stddev", self.image_stddev, low=0, low_open=True)
        _number("data", "image_mean", self.image_mean)
        names = [v.name for v in (*self.volumes, *self.validation_volumes)]
        if len(set(names)) != len(names):
            raise InputError(f"data.volumes: names must be unique, got {names}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation of each example (image and labels alike where geometric)."""

    # Axis permutations among axes of equal resolution (all 6 when isotropic) and flips of
    # every axis: 48 transforms on isotropic data, 16 on anisotropic z.
    permute_axes: bool = True
    flip_axes: bool = True
    # Image = image * (1 + U(-contrast, contrast)) + U(-brightness, brightness), in
    # normalized units (stddevs).
    contrast: float = 0.1
    brightness: float = 0.1
    # Probability per section of replacing it with the mean value (a missing section).
    missing_section_probability: float = 0.01
    # Probability per example of shifting all sections above a random z by up to
    # `misalignment_max_shift` voxels in y and x (labels shifted along).
    misalignment_probability: float = 0.05
    misalignment_max_shift: int = 4

    def __post_init__(self) -> None:
        for name in ("contrast", "brightness"):
            _number("augment", name, getattr(self, name), low=0.0)
        for name in ("missing_section_probability", "misalignment_probability"):
            _number("augment", name, getattr(self, name), low=0.0, high=1.0)
        _number("augment", "misalignment_max_shift", self.misalignment_max_shift, low=0, integer=True)
        for name in ("permute_axes", "flip_axes"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"augment.{name}={getattr(self, name)!r}: expected true or false")


@dataclass(frozen=True)
class OptimizerConfig:
    """The reference's optimizer flags; its default was plain SGD at 0.001."""

    name: str = "sgd"
    learning_rate: float = 0.001
    momentum: float = 0.9
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    epsilon: float = 1e-8
    rmsprop_decay: float = 0.9
    # Gradients are clipped elementwise to +/- this value (reference model's grad clipping);
    # 0 disables it.
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise InputError(f"optimizer.name={self.name!r}: expected one of {OPTIMIZERS}")
        _number("optimizer", "learning_rate", self.learning_rate, low=0, low_open=True)
        for name in ("momentum", "adam_beta1", "adam_beta2", "rmsprop_decay"):
            _number("optimizer", name, getattr(self, name), low=0.0, high=1.0)
        _number("optimizer", "epsilon", self.epsilon, low=0, low_open=True)
        _number("optimizer", "grad_clip", self.grad_clip, low=0.0)


@dataclass(frozen=True)
class TrainingConfig:
    """The loop: batch, movement inside examples, stopping, checkpoints, summaries."""

    out_dir: str = "runs/ffn"
    batch_size: int = 4  # per replica; the global batch is this x replicas
    max_steps: int = 100000
    # Wall-clock budget; training stops (with a final checkpoint) when it is spent. 0 = none.
    max_minutes: float = 0.0
    # 'fixed': the centre, then the 6 face moves +/- deltas, each taken only when the
    # network's own prediction at the target passes move_threshold (reference default);
    # 'max_pred': the inference movement policy (face maxima), within fov_moves steps.
    fov_policy: str = "fixed"
    fov_moves: int = 1
    move_threshold: float = 0.9
    init_activation: float = 0.95  # seed voxel of a fresh example
    seed_pad: float = 0.05  # the rest of a fresh mask
    # Soft targets: label 1 -> 1 - label_softness, 0 -> label_softness.
    label_softness: float = 0.05
    # Loss weight of the voxels just *outside* the object, within boundary_radius voxels of it
    # (6-connected steps): the membrane and the neighbour's rim. 1 = every voxel alike (the
    # reference). A leak through one membrane costs a few hundred voxels of one FOV mask but
    # merges two whole cells once inference floods on from it, so the loss can price it higher.
    boundary_weight: float = 1.0
    boundary_radius: int = 2
    seed: int = 0
    checkpoint_every_steps: int = 500
    # A node killed loses at most this much work.
    checkpoint_every_seconds: float = 300.0
    # How many of the latest checkpoints train_state/ keeps; 0 keeps every one (for
    # evaluating each checkpoint after the run). Milestone checkpoints below are always kept.
    keep_checkpoints: int = 3
    # Extra checkpoints at these exact steps (e.g. to compare with another trainer at equal steps).
    checkpoint_at_steps: tuple[int, ...] = ()
    # Extra checkpoints once the process has used this much CPU time (minutes; user + system of
    # all threads), e.g. "20 minutes of one core" on a machine shared with other work.
    checkpoint_at_cpu_minutes: tuple[float, ...] = ()
    # TensorFlow thread pools (0 = TensorFlow's default, all cores); 1 and 1 = one core.
    # Applied before TensorFlow runs its first op; ignored with a warning after that.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    summary_every_steps: int = 20
    validation_every_steps: int = 200
    validation_examples: int = 16
    # Fine-tuning: an exaconnect checkpoint directory or a reference TF1 prefix whose weights
    # start the run (ignored when out_dir already holds a training checkpoint to resume).
    init_checkpoint: str | None = None
    strategy: str = "default"
    # Logical CPU devices to split the CPU into (for 'mirrored' on a CPU-only node); 0 = off.
    logical_cpus: int = 0
    device: str = "auto"
    # A tqdm bar (rate, ETA) on a terminal; elsewhere (logs, workers) one line per
    # `progress_every_steps` (0 = about every 5 % of max_steps).
    progress: bool = True
    progress_every_steps: int = 0
    # Same seeds and TensorFlow op determinism: the same model from the same config on the same
    # machine (the demo model). Slower on GPUs; on CPUs it costs little.
    deterministic: bool = False

    def __post_init__(self) -> None:
        s = "training"
        for name, low in (("batch_size", 1), ("max_steps", 1), ("fov_moves", 0), ("checkpoint_every_steps", 1),
                          ("keep_checkpoints", 0), ("intra_op_threads", 0), ("inter_op_threads", 0), ("progress_every_steps", 0), ("summary_every_steps", 1), ("validation_every_steps", 1),
                          ("validation_examples", 0), ("logical_cpus", 0), ("seed", 0)):
            _number(s, name, getattr(self, name), low=low, integer=True)
        _number(s, "max_minutes", self.max_minutes, low=0.0)
        for name, integer in (("checkpoint_at_steps", True), ("checkpoint_at_cpu_minutes", False)):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)):
                raise InputError(f"{s}.{name}={values!r}: expected a list of numbers")
            object.__setattr__(self, name, tuple(sorted(
                _number(s, name, v, low=0, low_open=True, integer=integer) for v in values)))
        _number(s, "checkpoint_every_seconds", self.checkpoint_every_seconds, low=0, low_open=True)
        for name in ("move_threshold", "init_activation", "seed_pad"):
            _number(s, name, getattr(self, name), low=0.0, high=1.0, low_open=True)
            if getattr(self, name) >= 1.0:
                raise InputError(f"{s}.{name}={getattr(self, name)!r}: expected a probability below 1")
        _number(s, "label_softness", self.label_softness, low=0.0, high=0.5)
        _number(s, "boundary_weight", self.boundary_weight, low=0.0)
        _number(s, "boundary_radius", self.boundary_radius, low=1, integer=True)
        if self.fov_policy not in FOV_POLICIES:
            raise InputError(f"{s}.fov_policy={self.fov_policy!r}: expected one of {FOV_POLICIES}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"{s}.strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.device not in DEVICES:
            raise InputError(f"{s}.device={self.device!r}: expected one of {DEVICES}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise InputError(f"{s}.out_dir: expected a directory path")
        for name in ("progress", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{s}.{name}={getattr(self, name)!r}: expected true or false")


EVAL_METRICS = ("adapted_rand_error", "vi", "vi_merge", "vi_split")


@dataclass(frozen=True)
class EvaluationConfig:
    """Checkpoint evaluation by segmentation quality (what a user's inference will produce).

    Each evaluation point segments every box of `boxes` (layers or stacks, like
    data.volumes; the bbox may lie anywhere, off the origin and the chunk grid) with the run's
    inference options (the `inference` section, updated by `inference` here) and records VI
    (split, merge), adapted Rand error and the unsegmented fraction against the labels;
    unsegmented voxels count as one segment. `exaconnect train summary` plots the curves and
    exports the best checkpoint by `metric` (lower is better) as the run's model.
    """

    boxes: tuple[VolumeSource, ...] = ()
    # Every this many steps a weights checkpoint is kept (never deleted) and evaluated; 0 = off.
    every_steps: int = 0
    # Queue root for the evaluation tasks (they go to ROOT/train, as `--queue ROOT` does; drain
    # with `exaconnect queue work ROOT/train`); none = evaluate in the training process
    # (training pauses; the pause counts neither in throughput nor in max_minutes).
    queue: str | None = None
    metric: str = "adapted_rand_error"
    # Inference option overrides for evaluation only (e.g. {min_segment_size: 100}).
    inference: dict = field(default_factory=dict)
    # Hand unsegmented voxels to neighbouring objects before scoring (ffn.fill), as
    # `exaconnect segment --fill-unsegmented` would.
    fill_unsegmented: bool = False
    fill_sigma: float = 1.0

    def __post_init__(self) -> None:
        _number("evaluation", "every_steps", self.every_steps, low=0, integer=True)
        _number("evaluation", "fill_sigma", self.fill_sigma, low=0, low_open=True)
        if self.metric not in EVAL_METRICS:
            raise InputError(f"evaluation.metric={self.metric!r}: expected one of {EVAL_METRICS}")
        if self.queue is not None and (not isinstance(self.queue, str) or not self.queue):
            raise InputError(f"evaluation.queue={self.queue!r}: expected a queue root such as queues or fq://queues")
        if not isinstance(self.inference, Mapping):
            raise InputError(f"evaluation.inference={self.inference!r}: expected a mapping of inference options")
        if not isinstance(self.fill_unsegmented, bool):
            raise InputError(f"evaluation.fill_unsegmented={self.fill_unsegmented!r}: expected true or false")
        if self.every_steps and not self.boxes:
            raise InputError("evaluation.every_steps is set but evaluation.boxes is empty: name at least one "
                             "box (name, image, labels, bbox)")
        names = [b.name for b in self.boxes]
        if len(set(names)) != len(names):
            raise InputError(f"evaluation.boxes: names must be unique, got {names}")
        object.__setattr__(self, "inference", dict(self.inference))


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(depth=4, fov_size=(17, 17, 17),
                                                                   deltas=(4, 4, 4), features=16))
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # Inference options stored beside the exported model (normalization is taken from data).
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        if not self.data.volumes:
            raise InputError("data.volumes: at least one training volume is needed")

    @property
    def lom_radius_zyx(self) -> tuple[int, int, int]:
        if self.data.lom_radius is not None:
            return tuple(reversed(self.data.lom_radius))  # type: ignore[return-value]
        return tuple(f // 2 + d for f, d in zip(self.model.fov_zyx, self.model.deltas_zyx))  # type: ignore[return-value]

    @property
    def example_shape_zyx(self) -> tuple[int, int, int]:
        """The image/label patch one example moves inside (reference train_image_size)."""
        return tuple(f + 2 * d * self.training.fov_moves  # type: ignore[return-value]
                     for f, d in zip(self.model.fov_zyx, self.model.deltas_zyx))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section(cls: type, data: Any, section: str, convert: Mapping[str, Any] | None = None) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"{section}: expected a mapping of options, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{section}: unknown option(s) {unknown}; valid options are {sorted(names)}")
    values = dict(data)
    for key, fn in (convert or {}).items():
        if key in values and values[key] is not None:
            values[key] = fn(values[key])
    try:
        return cls(**values)
    except TypeError as exc:
        raise InputError(f"{section}: {exc}") from None


def _volumes(items: Any, section: str) -> tuple[VolumeSource, ...]:
    if not isinstance(items, (list, tuple)):
        raise InputError(f"{section}: expected a list of volumes")
    out = []
    for i, item in enumerate(items):
        convert = {"bbox": tuple, "resolution": tuple}
        out.append(_section(VolumeSource, item, f"{section}[{i}]", convert))
    return tuple(out)


def train_config_from_dict(data: Mapping[str, Any], source: str = "train config") -> TrainConfig:
    sections = ("model", "data", "augment", "optimizer", "training", "inference", "evaluation")
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: expected a mapping with sections {sections}")
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise InputError(f"{source}: unknown section(s) {unknown}; valid sections are {list(sections)}")
    model = data.get("model") or {}
    if not isinstance(model, Mapping):
        raise InputError(f"{source} [model]: expected a mapping")
    model_cfg = model_config_from_dict(model, f"{source} [model]") if model else TrainConfig.__dataclass_fields__[
        "model"].default_factory()  # type: ignore[misc]
    data_section = dict(data.get("data") or {})
    if "volumes" in data_section:
        data_section["volumes"] = _volumes(data_section["volumes"], "data.volumes")
    if "validation_volumes" in data_section:
        data_section["validation_volumes"] = _volumes(data_section["validation_volumes"], "data.validation_volumes")
    data_cfg = _section(DataConfig, data_section, "data", {"lom_radius": tuple, "thresholds": tuple})
    inference = data.get("inference") or {}
    return TrainConfig(
        model=model_cfg,
        data=data_cfg,
        augment=_section(AugmentConfig, data.get("augment"), "augment"),
        optimizer=_section(OptimizerConfig, data.get("optimizer"), "optimizer"),
        training=_section(TrainingConfig, data.get("training"), "training"),
        inference=inference_options_from_dict(inference, f"{source} [inference]") if inference else InferenceOptions(),
        evaluation=_evaluation(data.get("evaluation"), inference),
    )


def _evaluation(data: Any, inference: Mapping[str, Any]) -> EvaluationConfig:
    if data is None:
        return EvaluationConfig()
    if not isinstance(data, Mapping):
        raise InputError("evaluation: expected a mapping of options")
    section = dict(data)
    if "boxes" in section:
        section["boxes"] = _volumes(section["boxes"], "evaluation.boxes")
    config = _section(EvaluationConfig, section, "evaluation")
    # The overrides must make valid inference options now, not in a worker an hour later.
    try:
        inference_options_from_dict({**dict(inference or {}), **config.inference}, "evaluation.inference")
    except InputError as exc:
        raise InputError(f"evaluation.inference: {exc}") from None
    return config


def load_train_config(path: str | Path, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> TrainConfig:
    """Reads a YAML (or JSON) training config; `overrides` replace keys per section."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: training config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: cannot parse YAML: {exc}") from None
    if overrides:
        data = merge_overrides(data, overrides)
    return train_config_from_dict(data, str(path))


def merge_overrides(data: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(data).items()}
    for section, values in overrides.items():
        base = merged.get(section) or {}
        if not isinstance(base, Mapping):
            raise InputError(f"{section}: expected a mapping to override")
        merged[section] = merged_mapping(base, values)
    return merged


def config_to_yaml(config: TrainConfig) -> str:
    import yaml

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return yaml.safe_dump(plain(config.to_dict()), sort_keys=False)


def model_config_of(config: TrainConfig):
    """The inference config a trained model is saved with: its architecture and the data's
    image normalisation."""
    from ..config import FFNConfig

    inference = dataclasses.replace(config.inference, image_mean=config.data.image_mean, image_stddev=config.data.image_stddev)
    return FFNConfig(model=config.model, inference=inference)
