"""Create and open neuroglancer precomputed layers (through cloud-volume), with provenance.

A layer is named everywhere by one string: a URL (`file://`, `gs://`, `s3://`, `https://`) or a
plain local path, which is turned into a `file://` URL here so that tasks, logs and viewer links
all carry the same name.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from exaconnect import __version__
from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.bbox import Box, Triple, require_inside, snap_to_grid
from exaconnect.precomputed.chunks import install_chunk_guard

IMAGE_ENCODINGS = ("raw", "jpeg")
SEGMENTATION_ENCODINGS = ("compressed_segmentation", "compresso", "raw")
IMAGE_DTYPES = ("uint8", "uint16", "float32")
SEGMENTATION_DTYPES = ("uint32", "uint64")
REMOTE_PREFIXES = ("gs://", "s3://", "http://", "https://", "file://", "mem://", "matrix://")
# Anything shaped `scheme://` that we do not serve is refused rather than taken for a relative path
# (`ftp://host/x` would otherwise become the folder `./ftp:/host/x`).
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class LayerUrl(str):
    """A layer's one name, as `layer_url` makes it (`file:///abs/path`, `gs://bucket/x`, ...).

    Made once at the edge (the CLI's layer arguments, a stage's layer fields, the pipeline file's
    layers), it travels as itself: `layer_url` of a LayerUrl returns it unchanged, so code below
    the edge can take a `LayerUrl` parameter and use it as it is. It is a str, so it serialises
    into task payloads and JSON like any name.
    """

    __slots__ = ()


def layer_url(path: str) -> LayerUrl:
    """A plain local path becomes an absolute `file://` URL; URLs pass through unchanged; a URL
    of any other scheme is an InputError."""
    if isinstance(path, LayerUrl):
        return path
    return LayerUrl(_normalised(path))


def _normalised(path: str) -> str:
    text = str(path)
    if text.startswith("precomputed://"):
        text = text[len("precomputed://") :]
    if text.startswith(REMOTE_PREFIXES):
        return text.rstrip("/")
    scheme = _URL_SCHEME.match(text)
    if scheme:
        raise InputError(f"layer {path}: unsupported URL scheme {scheme.group(1)}://; expected a local path or one of "
                         + ", ".join(REMOTE_PREFIXES))
    return "file://" + os.path.abspath(os.path.expanduser(text))


def local_path(url: str) -> str | None:
    """The filesystem path of a `file://` layer, else None."""
    url = layer_url(url)
    return url[len("file://") :] if url.startswith("file://") else None


@dataclass(frozen=True)
class LayerSpec:
    """Geometry and encoding of a new layer (mip 0, x/y/z order, resolution in nm)."""

    layer_type: str
    dtype: str
    size: Triple
    resolution: tuple[float, float, float] = (1.0, 1.0, 1.0)
    voxel_offset: Triple = (0, 0, 0)
    chunk_size: Triple = (64, 64, 64)
    encoding: str | None = None
    num_channels: int = 1

    def __post_init__(self) -> None:
        if self.layer_type not in ("image", "segmentation"):
            raise InputError(f"--type: {self.layer_type!r}; expected 'image' or 'segmentation'")
        allowed_dtypes = IMAGE_DTYPES if self.layer_type == "image" else SEGMENTATION_DTYPES
        if self.dtype not in allowed_dtypes:
            raise InputError(
                f"dtype {self.dtype} is not supported for a {self.layer_type} layer; expected one of {allowed_dtypes}"
            )
        allowed_encodings = IMAGE_ENCODINGS if self.layer_type == "image" else SEGMENTATION_ENCODINGS
        if self.resolved_encoding not in allowed_encodings:
            raise InputError(
                f"--encoding {self.resolved_encoding!r} is not valid for a {self.layer_type} layer; "
                f"expected one of {allowed_encodings}"
            )
        if self.resolved_encoding == "jpeg" and self.dtype != "uint8":
            raise InputError(f"--encoding jpeg needs uint8 images; this source is {self.dtype}")
        if not all(math.isfinite(float(r)) and float(r) > 0 for r in self.resolution):
            raise InputError(f"--resolution {tuple(self.resolution)}: expected three finite positive numbers (nm)")
        if min(self.size) <= 0 or min(self.chunk_size) <= 0 or min(self.resolution) <= 0:
            raise InputError(
                f"layer size {self.size}, chunk size {self.chunk_size} and resolution {self.resolution} "
                "must be positive"
            )

    @property
    def resolved_encoding(self) -> str:
        if self.encoding:
            return self.encoding
        return "raw" if self.layer_type == "image" else "compressed_segmentation"

    @property
    def bounds(self) -> Box:
        return Box.from_shape(self.size, self.voxel_offset)

    def info(self) -> dict:
        from cloudvolume import CloudVolume

        return CloudVolume.create_new_info(
            num_channels=self.num_channels,
            layer_type=self.layer_type,
            data_type=self.dtype,
            encoding=self.resolved_encoding,
            resolution=list(self.resolution),
            voxel_offset=list(self.voxel_offset),
            volume_size=list(self.size),
            chunk_size=list(self.chunk_size),
        )


@dataclass
class Provenance:
    """One processing step: which stage made the layer, from what, with which parameters."""

    stage: str
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: Sequence[str] = ()

    def record(self) -> dict:
        return {
            "method": {"stage": self.stage, "parameters": _jsonable(self.parameters)},
            "inputs": list(self.inputs),
            "by": f"exaconnect {__version__}",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def chunk_compression(url: str) -> str | bool:
    """gzip on object stores (served with Content-Encoding, so every reader decodes it), none on
    local disk: there cloud-volume would write `chunk.gz` files, which tensorstore and plain
    static file servers do not find under the chunk's name."""
    return False if layer_url(url).startswith("file://") else "gzip"


def _cloudvolume(url: str, mip: int = 0, **kwargs: Any):
    from cloudvolume import CloudVolume

    install_chunk_guard()  # every chunk this process decodes is checked first (precomputed.chunks)
    return CloudVolume(url, mip=mip, progress=False, fill_missing=kwargs.pop("fill_missing", False),
                       compress=chunk_compression(url), **kwargs)


def create_layer(path: str, spec: LayerSpec, provenance: Provenance, overwrite: bool = False):
    """Write the info and provenance of a new layer and return a CloudVolume on it.

    Call this only after the data to be written has been validated: the info file is what
    makes a layer exist, so nothing else is written before it.
    """
    url = layer_url(path)
    existing = read_info(url)
    if existing is not None and not overwrite:
        if _same_geometry(existing, spec.info()):
            vol = _cloudvolume(url)
            add_provenance(vol, provenance)
            return vol
        raise LayerError(
            f"layer {url} already exists with a different geometry or encoding; "
            "expected a new path (or pass --overwrite)"
        )
    vol = _cloudvolume(url, info=spec.info())
    vol.commit_info()
    vol.provenance.description = f"exaconnect {provenance.stage}"
    vol.provenance.sources = list(provenance.inputs)
    vol.provenance.processing = [provenance.record()]
    vol.commit_provenance()
    return vol


def _same_geometry(a: dict, b: dict) -> bool:
    keys = ("type", "data_type", "num_channels")
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    scale_a, scale_b = a["scales"][0], b["scales"][0]
    return all(
        scale_a.get(k) == scale_b.get(k) for k in ("size", "voxel_offset", "resolution", "chunk_sizes", "encoding")
    )


def add_provenance(vol, provenance: Provenance) -> None:
    """Append a record to the layer's stored provenance.

    The stored file is re-read first: another writer (igneous's task creation commits the copy it
    loaded when it opened the layer) may have written it since `vol` was opened, and appending to
    a stale copy would drop that writer's records, or ours.
    """
    try:
        vol.refresh_provenance()
    except Exception:  # a layer without a provenance file yet keeps the in-memory one
        pass
    vol.provenance.processing.append(provenance.record())
    for source in provenance.inputs:
        if source not in vol.provenance.sources:
            vol.provenance.sources.append(source)
    vol.commit_provenance()


def read_info(url: str) -> dict | None:
    """The parsed info file of a layer, None if there is none, LayerError if it is unreadable."""
    from cloudfiles import CloudFiles

    url = layer_url(url)
    try:
        raw = CloudFiles(url).get("info")
    except Exception as exc:  # cloudfiles wraps many transport errors
        raise LayerError(f"layer {url}: cannot read its info file ({exc})") from exc
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError as exc:
        raise LayerError(f"layer {url}: info file is not valid JSON ({exc}); expected a precomputed info") from exc
    problems = _info_problems(info)
    if problems:
        raise LayerError(f"layer {url}: malformed info file: {problems}; expected a neuroglancer precomputed info")
    return info


def _info_problems(info: Any) -> str:
    if not isinstance(info, dict):
        return "not a JSON object"
    for key in ("type", "data_type", "num_channels", "scales"):
        if key not in info:
            return f"missing key {key!r}"
    if not isinstance(info["scales"], list) or not info["scales"]:
        return "'scales' must be a non-empty list"
    for i, scale in enumerate(info["scales"]):
        for key in ("resolution", "size", "voxel_offset", "chunk_sizes", "encoding", "key"):
            if key not in scale:
                return f"scales[{i}] is missing {key!r}"
    return ""


def open_layer(path: str, mip: int = 0, layer_type: str | None = None, fill_missing: bool = False):
    """A CloudVolume on an existing layer, with one clear error if it is absent or malformed."""
    url = layer_url(path)
    info = read_info(url)
    if info is None:
        raise LayerError(f"layer {url} does not exist (no info file); expected an existing precomputed layer")
    if layer_type is not None and info["type"] != layer_type:
        raise LayerError(f"layer {url} is a {info['type']} layer; expected a {layer_type} layer")
    if not 0 <= mip < len(info["scales"]):
        raise LayerError(f"layer {url} has mips 0..{len(info['scales']) - 1}; mip {mip} was asked for")
    return _cloudvolume(url, mip=mip, fill_missing=fill_missing)


def layer_bounds(vol) -> Box:
    """The mip-0 bounds of a layer as a Box."""
    bounds = vol.meta.bounds(0)
    return Box(tuple(int(v) for v in bounds.minpt), tuple(int(v) for v in bounds.maxpt))  # type: ignore[arg-type]


def read_box(vol, box: Box) -> np.ndarray:
    """Voxels of `box` (mip-0 coordinates at mip 0) as a [z, y, x] array, the FFN's and numpy's order."""
    data = np.asarray(vol[box.slices()])
    return np.ascontiguousarray(data[..., 0].transpose(2, 1, 0))


def chunk_name(vol, box: Box, mip: int | None = None) -> str:
    """The file name (relative to the layer) of the chunk whose box, clipped to the bounds, is `box`."""
    mip = vol.mip if mip is None else mip
    (x0, y0, z0), (x1, y1, z1) = box.start, box.stop
    return f"{vol.meta.key(mip)}/{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"


def mip_bounds(vol, mip: int | None = None) -> Box:
    """A layer's bounds at `mip` (default: the volume's current mip) in that mip's voxels."""
    bounds = vol.meta.bounds(vol.mip if mip is None else mip)
    return Box(tuple(int(v) for v in bounds.minpt), tuple(int(v) for v in bounds.maxpt))  # type: ignore[arg-type]


def write_box(vol, box: Box, data_zyx: np.ndarray) -> None:
    """Write a [z, y, x] array into `box` of the layer (at the volume's mip), any box inside it.

    Only whole chunk files are ever written. A box off the chunk grid is widened to whole chunks;
    the chunks it covers partly are read first and keep their voxels outside the box, and those
    that do not exist yet are created, with zeros outside the box. (cloud-volume's own
    `non_aligned_writes` instead fails with EmptyVolumeException on a chunk that does not exist
    yet, which is every edge chunk of a new layer.)

    Concurrency: the read-modify-write of a partial chunk is not atomic, so two writers must never
    share a chunk. Service tasks write chunk-aligned boxes (`chunk_grid(..., align_to=chunk_size)`);
    an interactive box (`exaconnect segment --bbox`) is the only writer of its layer.
    """
    if tuple(data_zyx.shape) != tuple(reversed(box.shape)):
        raise InputError(f"array of shape {data_zyx.shape} does not fill box {box} (z,y,x {tuple(reversed(box.shape))})")
    bounds = mip_bounds(vol)
    require_inside(box, bounds, f"write into layer {vol.cloudpath}")
    data = np.ascontiguousarray(data_zyx.transpose(2, 1, 0)).astype(vol.dtype, copy=False)
    chunk = tuple(int(c) for c in vol.meta.chunk_size(vol.mip))
    whole = snap_to_grid(box, chunk, bounds.start, bounds)
    if whole == box:
        vol[box.slices()] = data
        return
    buffer = np.zeros(whole.shape, dtype=vol.dtype)
    fill_missing = vol.fill_missing
    vol.fill_missing = True  # chunks not written yet are created here, zeros outside the box
    try:
        for part in _partial_chunk_layers(box, whole, chunk, bounds.start):
            at = tuple(slice(a - o, b - o) for a, b, o in zip(part.start, part.stop, whole.start))
            buffer[at] = np.asarray(vol[part.slices()])[..., 0]
    finally:
        vol.fill_missing = fill_missing
    buffer[tuple(slice(a - o, b - o) for a, b, o in zip(box.start, box.stop, whole.start))] = data
    vol[whole.slices()] = buffer


def _partial_chunk_layers(box: Box, whole: Box, chunk: Triple, origin: Triple) -> list[Box]:
    """The one-chunk-thick slabs of `whole` (box widened to the chunk grid) at each face where
    `box` does not end on the grid: together they hold every chunk that `box` covers partly."""
    parts = []
    for axis in range(3):
        if box.start[axis] != whole.start[axis]:
            stop = list(whole.stop)
            stop[axis] = min(whole.stop[axis], whole.start[axis] + chunk[axis] - (whole.start[axis] - origin[axis]) % chunk[axis])
            parts.append(Box(whole.start, tuple(stop)))  # type: ignore[arg-type]
        if box.stop[axis] != whole.stop[axis]:
            start = list(whole.start)
            start[axis] = origin[axis] + (whole.stop[axis] - 1 - origin[axis]) // chunk[axis] * chunk[axis]
            parts.append(Box(tuple(start), whole.stop))  # type: ignore[arg-type]
    return parts
