"""What a layer is, for the viewer: its neuroglancer layer kind, geometry and where it lives.

The kind comes from the precomputed `info` (`type`, and a `mesh` / `skeletons` key on a
segmentation) refined by the stage name that exaconnect writes into the layer's `provenance`
(see `exaconnect.precomputed.layers.Provenance`), so that an FFN probability map or an aligned
stack gets a fitting display even though both are plain `image` layers in the info.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from exaconnect.errors import LayerError
from exaconnect.precomputed.layers import layer_url, local_path, read_info

# Kinds the state builder knows how to display.
IMAGE = "image"
PROBABILITY = "probability"
ALIGNMENT = "alignment"
SEGMENTATION = "segmentation"

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
    def resolution(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.info["scales"][0]["resolution"])  # type: ignore[return-value]

    @property
    def voxel_offset(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.info["scales"][0]["voxel_offset"])  # type: ignore[return-value]

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.info["scales"][0]["size"])  # type: ignore[return-value]

    @property
    def bounds_nm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Physical extent (nm) of mip 0: (lower corner, upper corner)."""
        lower = tuple(o * r for o, r in zip(self.voxel_offset, self.resolution))
        upper = tuple((o + s) * r for o, s, r in zip(self.voxel_offset, self.size, self.resolution))
        return lower, upper

    @property
    def has_mesh(self) -> bool:
        return "mesh" in self.info

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
    """The display kind for an info `type` and a provenance stage name."""
    if info["type"] == "segmentation":
        return SEGMENTATION
    if info["type"] != "image":
        raise LayerError(f"info type {info['type']!r} cannot be shown; expected 'image' or 'segmentation'")
    lowered = (stage or "").lower()
    if any(word in lowered for word in _PROBABILITY_STAGES):
        return PROBABILITY
    if any(word in lowered for word in _ALIGNMENT_STAGES):
        return ALIGNMENT
    return IMAGE


def inspect_layer(layer: str) -> LayerInfo:
    """Read a layer's info (and provenance) and classify it; LayerError names the layer if absent."""
    url = layer_url(layer)
    info = read_info(url)
    if info is None:
        raise LayerError(f"layer {url} has no info file; expected an existing precomputed layer")
    stage = provenance_stage(url)
    try:
        kind = layer_kind(info, stage)
    except LayerError as exc:
        raise LayerError(f"layer {url}: {exc}") from exc
    return LayerInfo(url=url, kind=kind, info=info, stage=stage)
