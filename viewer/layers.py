"""What a layer is, for the viewer: its neuroglancer layer kind, geometry and where it lives.

The kind comes from the precomputed `info` (`type`, and a `mesh` / `skeletons` key on a
segmentation) refined by the stage name that exaconnect writes into the layer's `provenance`
(see `exaconnect.precomputed.layers.Provenance`), so that an FFN probability map or an aligned
stack gets a fitting display even though both are plain `image` layers in the info. A
precomputed annotation collection (`"@type": "neuroglancer_annotations_v1"`, such as the
montage's tile outlines) is a layer too; its geometry comes from its `dimensions` and bounds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from exaconnect.errors import LayerError
from exaconnect.precomputed.layers import layer_url, local_path, read_info

# Kinds the state builder knows how to display.
IMAGE = "image"
PROBABILITY = "probability"
ALIGNMENT = "alignment"
SEGMENTATION = "segmentation"
ANNOTATION = "annotation"

ANNOTATION_TYPE = "neuroglancer_annotations_v1"
_ANNOTATION_KEYS = ("dimensions", "lower_bound", "upper_bound", "annotation_type", "by_id", "spatial")
# Metres per unit neuroglancer accepts in an annotation info's `dimensions`.
_UNIT_NM = {"m": 1e9, "mm": 1e6, "um": 1e3, "µm": 1e3, "nm": 1.0, "pm": 1e-3}

# Stage-name fragments (lower case) that mark an image layer as an FFN probability map or an
# alignment output; the services name their stages with these words.
_PROBABILITY_STAGES = ("probab", "ffn_prob", "affinit", "boundary")
_ALIGNMENT_STAGES = ("align", "warp", "render")


@dataclass(frozen=True)
class LayerInfo:
    """One layer as the viewer needs it; geometry is at mip 0 in x, y, z order."""

    url: str  # the layer's one name: file://, gs://, s3://, http(s)://
    kind: str
    info: dict
    stage: str | None = None

    @property
    def name(self) -> str:
        """A short display name: the last path component of the URL."""
        return self.url.rstrip("/").rsplit("/", 1)[-1] or self.url

    @property
    def local_path(self) -> Path | None:
        path = local_path(self.url)
        return Path(path) if path is not None else None

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def is_annotation(self) -> bool:
        return self.kind == ANNOTATION

    @property
    def resolution(self) -> tuple[float, float, float]:
        if self.is_annotation:
            dims = self.info["dimensions"]
            return tuple(float(dims[a][0]) * _UNIT_NM[dims[a][1]] for a in "xyz")  # type: ignore[return-value]
        return tuple(float(v) for v in self.info["scales"][0]["resolution"])  # type: ignore[return-value]

    @property
    def voxel_offset(self) -> tuple[int, int, int]:
        if self.is_annotation:
            return tuple(math.floor(float(v)) for v in self.info["lower_bound"])  # type: ignore[return-value]
        return tuple(int(v) for v in self.info["scales"][0]["voxel_offset"])  # type: ignore[return-value]

    @property
    def size(self) -> tuple[int, int, int]:
        if self.is_annotation:
            upper = (math.ceil(float(v)) for v in self.info["upper_bound"])
            return tuple(max(1, u - o) for u, o in zip(upper, self.voxel_offset))  # type: ignore[return-value]
        return tuple(int(v) for v in self.info["scales"][0]["size"])  # type: ignore[return-value]

    @property
    def bounds_nm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Physical extent (nm) of mip 0: (lower corner, upper corner)."""
        lower = tuple(o * r for o, r in zip(self.voxel_offset, self.resolution))
        upper = tuple((o + s) * r for o, s, r in zip(self.voxel_offset, self.size, self.resolution))
        return lower, upper

    @property
    def has_mesh(self) -> bool:
        return "mesh" in self.info and not self.is_annotation

    @property
    def has_skeletons(self) -> bool:
        return "skeletons" in self.info

    @property
    def num_channels(self) -> int:
        return int(self.info.get("num_channels", 1))


def provenance_stage(url: str) -> str | None:
    """The newest stage name recorded in a layer's provenance file, if any.

    exaconnect records `processing[i].method.stage`; a top-level `stage` is accepted too so
    that hand-written provenance files work. A missing or unreadable provenance is no error:
    layers made by other tools have none.
    """
    from cloudfiles import CloudFiles

    try:
        raw = CloudFiles(url).get("provenance")
        provenance = json.loads(raw) if raw else None
    except Exception:  # cloudfiles wraps many transport errors; provenance is optional
        return None
    if not isinstance(provenance, dict):
        return None
    for record in reversed(provenance.get("processing") or []):
        method = record.get("method") if isinstance(record, dict) else None
        if isinstance(method, dict) and isinstance(method.get("stage"), str):
            return method["stage"]
    stage = provenance.get("stage")
    return stage if isinstance(stage, str) else None


def layer_kind(info: dict, stage: str | None) -> str:
    """The display kind for an info (`@type` of an annotation collection, else `type`) and a
    provenance stage name."""
    if info.get("@type") == ANNOTATION_TYPE:
        return ANNOTATION
    if info.get("type") == "segmentation":
        return SEGMENTATION
    if info.get("type") != "image":
        raise LayerError(f"info type {info.get('type')!r} cannot be shown; expected 'image' or 'segmentation', "
                         f"or an annotation collection (@type {ANNOTATION_TYPE!r})")
    lowered = (stage or "").lower()
    if any(word in lowered for word in _PROBABILITY_STAGES):
        return PROBABILITY
    if any(word in lowered for word in _ALIGNMENT_STAGES):
        return ALIGNMENT
    return IMAGE


def _annotation_problems(info: dict) -> str:
    missing = [key for key in _ANNOTATION_KEYS if key not in info]
    if missing:
        return f"missing {', '.join(missing)}"
    dims = info["dimensions"]
    if not isinstance(dims, dict) or not all(
        isinstance(dims.get(a), list) and len(dims[a]) == 2 and isinstance(dims[a][0], (int, float)) and dims[a][0] > 0
        and dims[a][1] in _UNIT_NM for a in "xyz"
    ):
        return f"dimensions {dims!r}; expected x, y and z as [scale, unit] with a length unit"
    for key in ("lower_bound", "upper_bound"):
        bound = info[key]
        if not (isinstance(bound, list) and len(bound) == len(dims)
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bound)):
            return f"{key} {bound!r}; expected {len(dims)} finite numbers"
    return ""


def _annotation_info(url: str) -> dict | None:
    """The info of an annotation collection at `url`, None if the info there is not one (or absent)."""
    from cloudfiles import CloudFiles

    try:
        raw = CloudFiles(url).get("info")
        info = json.loads(raw) if raw else None
    except Exception:  # unreadable or not JSON: read_info says what is wrong with it
        return None
    if not isinstance(info, dict) or info.get("@type") != ANNOTATION_TYPE:
        return None
    problems = _annotation_problems(info)
    if problems:
        raise LayerError(f"layer {url}: malformed annotation info: {problems}; expected a neuroglancer precomputed "
                         "annotation info")
    return info


def inspect_layer(layer: str) -> LayerInfo:
    """Read a layer's info (and provenance) and classify it; LayerError names the layer if absent."""
    url = layer_url(layer)
    annotations = _annotation_info(url)
    if annotations is not None:
        return LayerInfo(url=url, kind=ANNOTATION, info=annotations)
    info = read_info(url)
    if info is None:
        raise LayerError(f"layer {url} has no info file; expected an existing precomputed layer")
    stage = provenance_stage(url)
    try:
        kind = layer_kind(info, stage)
    except LayerError as exc:
        raise LayerError(f"layer {url}: {exc}") from exc
    return LayerInfo(url=url, kind=kind, info=info, stage=stage)
