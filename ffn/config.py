"""Configuration of the flood-filling network and of inference, validated once at the edge.

Defaults are the published FIB-25 settings of the reference implementation (google/ffn,
`configs/inference_training_sample2.pbtxt` and the convstack_3d model arguments of its public
checkpoint). Geometry triples follow the reference's convention: `fov_size`, `deltas` and
`min_boundary_dist` are (x, y, z); image arrays and seeds are (z, y, x).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from exaconnect.errors import InputError

CONFIG_FILENAME = "ffn_config.json"

SEED_POLICIES = ("peaks", "list")
SEED_ORDERS = ("forward", "reverse")
PRECISIONS = ("float32", "bfloat16", "float16")


def _triple(name: str, value: Any, minimum: int) -> tuple[int, int, int]:
    try:
        items = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: expected three integers (x, y, z)") from None
    if len(items) != 3 or any(float(v) != i for v, i in zip(value, items)):
        raise InputError(f"{name}={value!r}: expected three integers (x, y, z)")
    if any(v < minimum for v in items):
        raise InputError(f"{name}={value!r}: every entry must be >= {minimum}")
    return items  # type: ignore[return-value]


def _probability(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: expected a probability in (0, 1)") from None
    # Thresholds are converted to logits, so 0 and 1 (infinite logits) are not usable.
    if not 0.0 < number < 1.0:
        raise InputError(f"{name}={value!r}: expected a probability strictly between 0 and 1")
    return number


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the convstack_3d FFN (reference `ConvStack3DFFNModel`)."""

    depth: int = 12
    fov_size: tuple[int, int, int] = (33, 33, 33)  # x, y, z
    deltas: tuple[int, int, int] = (8, 8, 8)  # x, y, z
    features: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or self.depth < 1:
            raise InputError(f"depth={self.depth!r}: expected an integer >= 1")
        if not isinstance(self.features, int) or self.features < 1:
            raise InputError(f"features={self.features!r}: expected an integer >= 1")
        fov = _triple("fov_size", self.fov_size, 1)
        if any(v % 2 == 0 for v in fov):
            # The canvas centres the FOV on a voxel; even sizes have no centre voxel.
            raise InputError(f"fov_size={self.fov_size!r}: every entry must be odd")
        deltas = _triple("deltas", self.deltas, 0)
        if any(d > f // 2 for d, f in zip(deltas, fov)):
            raise InputError(
                f"deltas={self.deltas!r}: a step must stay inside the FOV (<= fov_size // 2)"
            )
        object.__setattr__(self, "fov_size", fov)
        object.__setattr__(self, "deltas", deltas)

    @property
    def fov_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.fov_size))  # type: ignore[return-value]

    @property
    def deltas_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.deltas))  # type: ignore[return-value]

    def flops_per_evaluation(self) -> int:
        """Multiply-adds x 2 of one forward pass over a full FOV ('SAME' padding)."""
        voxels = math.prod(self.fov_size)
        f = self.features
        per_voxel = 27 * 2 * f + 2 * (self.depth - 1) * 27 * f * f + 27 * f * f + f
        return 2 * per_voxel * voxels


@dataclass(frozen=True)
class InferenceOptions:
    """How the FFN is run over a subvolume (reference `InferenceOptions` + request fields)."""

    image_mean: float = 128.0
    image_stddev: float = 33.0
    init_activation: float = 0.95
    pad_value: float = 0.05
    move_threshold: float = 0.9
    segment_threshold: float = 0.6
    min_segment_size: int = 1000
    min_boundary_dist: tuple[int, int, int] = (1, 1, 1)  # x, y, z
    # Reference proto2 default is 0: freezing of voxels the network called "outside" is active
    # as soon as any voxel of the FOV is above move_threshold. Negative disables it.
    disco_seed_threshold: float = 0.0
    seed_policy: str = "peaks"
    seeds: tuple[tuple[int, int, int], ...] | None = None  # (z, y, x), for seed_policy='list'
    # 'reverse' tries the seed points last to first, so objects claim contested voxels in
    # another order: a refinement pass's split consensus with a forward pass cuts the merges
    # that only one order makes (services/segment, --seed-order).
    seed_order: str = "forward"
    # Numerics of the network; float32 is the reference.
    precision: str = "float32"

    def __post_init__(self) -> None:
        for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
            object.__setattr__(self, name, _probability(name, getattr(self, name)))
        try:
            stddev = float(self.image_stddev)
            mean = float(self.image_mean)
        except (TypeError, ValueError):
            raise InputError(
                f"image_mean={self.image_mean!r}, image_stddev={self.image_stddev!r}: expected numbers"
            ) from None
        if not stddev > 0:
            raise InputError(f"image_stddev={self.image_stddev!r}: expected a positive number")
        object.__setattr__(self, "image_mean", mean)
        object.__setattr__(self, "image_stddev", stddev)
        if not isinstance(self.min_segment_size, int) or self.min_segment_size < 0:
            raise InputError(f"min_segment_size={self.min_segment_size!r}: expected an integer >= 0")
        object.__setattr__(
            self, "min_boundary_dist", _triple("min_boundary_dist", self.min_boundary_dist, 0)
        )
        object.__setattr__(self, "disco_seed_threshold", float(self.disco_seed_threshold))
        if self.seed_policy not in SEED_POLICIES:
            raise InputError(f"seed_policy={self.seed_policy!r}: expected one of {SEED_POLICIES}")
        if self.seed_order not in SEED_ORDERS:
            raise InputError(f"seed_order={self.seed_order!r}: expected one of {SEED_ORDERS}")
        if self.seed_policy == "list":
            if not self.seeds:
                raise InputError("seeds: seed_policy='list' needs a non-empty list of (z, y, x)")
        if self.seeds is not None:
            seeds = []
            for seed in self.seeds:
                seeds.append(_triple("seeds entry", seed, 0))
            object.__setattr__(self, "seeds", tuple(seeds))
        if self.precision not in PRECISIONS:
            raise InputError(f"precision={self.precision!r}: expected one of {PRECISIONS}")

    @property
    def min_boundary_dist_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.min_boundary_dist))  # type: ignore[return-value]


def _from_mapping(cls: type, data: Mapping[str, Any], source: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{source}: unknown {cls.__name__} parameter(s) {unknown}")
    values = {k: (tuple(v) if isinstance(v, list) and k != "seeds" else v) for k, v in data.items()}
    if values.get("seeds") is not None:
        values["seeds"] = tuple(tuple(s) for s in values["seeds"])
    return cls(**values)


def model_config_from_dict(data: Mapping[str, Any], source: str = "model config") -> ModelConfig:
    return _from_mapping(ModelConfig, data, source)


def inference_options_from_dict(
    data: Mapping[str, Any], source: str = "inference options"
) -> InferenceOptions:
    return _from_mapping(InferenceOptions, data, source)


@dataclass(frozen=True)
class FFNConfig:
    """What is stored beside a checkpoint: the architecture and the options it was tuned with."""

    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceOptions = field(default_factory=InferenceOptions)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "inference": dataclasses.asdict(self.inference)}


def save_config(config: FFNConfig, directory: str | Path) -> Path:
    """Writes `ffn_config.json` into `directory` (JSON is valid YAML, so either loader reads it)."""
    path = Path(directory) / CONFIG_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_config(path: str | Path) -> FFNConfig:
    """Reads a config file (JSON or YAML) with optional `model` and `inference` sections."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILENAME
    if not path.is_file():
        raise InputError(f"{path}: FFN config file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes one clear message
        raise InputError(f"{path}: cannot parse FFN config: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"model", "inference"}:
        raise InputError(f"{path}: expected a mapping with 'model' and/or 'inference' sections")
    return FFNConfig(
        model=model_config_from_dict(data.get("model") or {}, f"{path} [model]"),
        inference=inference_options_from_dict(data.get("inference") or {}, f"{path} [inference]"),
    )
