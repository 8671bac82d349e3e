"""Ingest: a stack of sections (folder of PNG/TIFF, multi-page TIFF, file.h5:dataset, .npy) into a
precomputed layer, one task per chunk-aligned z-slab so that many workers share a big stack."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from taskqueue import RegisteredTask

from exaconnect.errors import InputError
from exaconnect.precomputed.bbox import Box, Triple, parse_resolution, parse_triple
from exaconnect.precomputed.layers import (LayerSpec, LayerUrl, Provenance, create_layer, layer_url, open_layer,
                                           write_box)
from exaconnect.precomputed.sources import StackSource, absolute_source, check_labels, open_source
from exaconnect.precomputed.verify import record_checksums
from exaconnect.services.stages import Stage, StageCommand, register_command

if TYPE_CHECKING:
    from exaconnect.precomputed.empty_outputs import TakenBack


@dataclass(frozen=True)
class IngestOptions:
    layer_type: str = "image"
    resolution: tuple[float, float, float] = (1.0, 1.0, 1.0)
    voxel_offset: Triple = (0, 0, 0)
    chunk_size: Triple = (64, 64, 64)
    encoding: str | None = None
    overwrite: bool = False


def layer_dtype(source: StackSource, layer_type: str) -> str:
    """The layer dtype for a source: images keep theirs; labels widen to uint32/uint64 because
    compressed_segmentation only takes those."""
    dtype = np.dtype(source.dtype)
    if layer_type == "segmentation":
        check_labels(source)
        return "uint64" if dtype.itemsize > 4 else "uint32"
    if dtype.name not in ("uint8", "uint16", "float32"):
        raise InputError(f"source {source.description} has dtype {dtype}; image layers take uint8, uint16 or float32")
    return dtype.name


def prepare_ingest(src: str, dest: str, options: IngestOptions) -> tuple[StackSource, object]:
    """Validate the source completely, then create the layer (info written last, once valid)."""
    source = open_source(src)
    z, y, x = source.shape
    spec = LayerSpec(
        layer_type=options.layer_type,
        dtype=layer_dtype(source, options.layer_type),
        size=(x, y, z),
        resolution=options.resolution,
        voxel_offset=options.voxel_offset,
        chunk_size=options.chunk_size,
        encoding=options.encoding,
    )
    provenance = Provenance(
        stage="ingest",
        parameters={"source": absolute_source(src), "type": options.layer_type, "chunk_size": list(options.chunk_size),
                    "encoding": spec.resolved_encoding},
        inputs=[absolute_source(src)],
    )
    vol = create_layer(dest, spec, provenance, overwrite=options.overwrite)
    return source, vol


def slab_ranges(depth: int, slab_depth: int) -> list[tuple[int, int]]:
    return [(z, min(depth, z + slab_depth)) for z in range(0, depth, slab_depth)]


def ingest_slab(source: StackSource, vol, z_start: int, z_stop: int) -> None:
    """Copy source sections z_start:z_stop into the layer; rewriting gives the same chunks."""
    slab = source.read_slab(z_start, z_stop)
    offset = vol.meta.voxel_offset(0)
    box = Box.from_shape((slab.shape[2], slab.shape[1], slab.shape[0]), (offset[0], offset[1], offset[2] + z_start))
    write_box(vol, box, slab)
    # Read-back check and checksum manifest of the chunks just written (`exaconnect layer verify`).
    record_checksums(vol, box)


class IngestTask(RegisteredTask):
    """Copy one chunk-aligned z-slab of a source stack into an existing layer."""

    def __init__(self, src: str, dest: str, z_start: int, z_stop: int):
        super().__init__(src, dest, z_start, z_stop)

    def execute(self) -> None:
        source = open_source(self.src)
        vol = open_layer(self.dest)  # a full URL; a bare relative path would depend on the worker's cwd
        ingest_slab(source, vol, int(self.z_start), int(self.z_stop))


def create_ingest_tasks(src: str, dest: str, options: IngestOptions, queue: str | None = None) -> list[IngestTask]:
    """One task per chunk-aligned z-slab (slabs never share a chunk, so tasks never race).

    Payloads are self-contained: the source as an absolute path and the layer as a full URL, so a
    worker started in any directory (a pod, a PBS job) finds both. `queue`, when given, is checked
    before anything is written: an unusable queue must not leave a layer behind.
    """
    if queue is not None:
        from exaconnect.services.queue import queue_url

        queue_url(queue)
    source, vol = prepare_ingest(src, dest, options)
    url = layer_url(dest)
    src_abs = absolute_source(src)
    return [IngestTask(src_abs, url, a, b) for a, b in slab_ranges(source.shape[0], options.chunk_size[2])]


def ingest_now(src: str, dest: str, options: IngestOptions, progress: bool = True) -> None:
    """Ingest in this process, slab by slab, with a progress bar (for stacks one node can hold)."""
    from tqdm import tqdm

    source, vol = prepare_ingest(src, dest, options)
    for a, b in tqdm(slab_ranges(source.shape[0], options.chunk_size[2]), desc=f"ingest {src}", unit="slab", disable=not progress or None):
        ingest_slab(source, vol, a, b)


@dataclass(frozen=True)
class IngestStage(Stage):
    """The ingest of one source (one task per chunk-aligned z-slab)."""

    service: ClassVar[str] = "ingest"
    stage_name: ClassVar[str] = "ingest.slabs"
    description: ClassVar[str] = "sections -> precomputed"
    src: str
    dest: LayerUrl
    options: IngestOptions

    def __post_init__(self) -> None:
        super().__post_init__()
        # Workers may start elsewhere (a pod, a PBS job): a local source is stored absolute.
        path, h5, _ = str(self.src).partition(".h5:")
        if os.path.exists(path + h5[:-1] if h5 else str(self.src)):
            object.__setattr__(self, "src", absolute_source(self.src))

    def make_tasks(self) -> list:
        return create_ingest_tasks(self.src, self.dest, self.options)

    def reads(self) -> tuple[str, ...]:
        return (self.src,)

    def writes(self) -> tuple[str, ...]:
        return (self.dest,)

    def after_failure(self) -> TakenBack | None:
        from exaconnect.precomputed.empty_outputs import drop_empty_layer

        return drop_empty_layer(self.dest)


def _add_arguments(v) -> None:
    v.add_argument("src", help="source sections: a folder of PNG/TIFF, a multi-page TIFF, file.h5:dataset or .npy")
    v.add_argument("layer", help="destination layer (path or URL)")
    v.add_argument("--resolution", required=True, help="X,Y,Z voxel size in nm")
    v.add_argument("--type", choices=["image", "segmentation"], default="image")
    v.add_argument("--chunk-size", default="64,64,64", help="X,Y,Z chunk size (default 64,64,64)")
    v.add_argument("--voxel-offset", default="0,0,0", help="X,Y,Z of the first voxel")
    v.add_argument("--encoding", default=None, help="raw|jpeg for images, compressed_segmentation|compresso for labels")
    v.add_argument("--overwrite", action="store_true", help="replace an existing layer's info")


def _stages(args) -> list[Stage]:
    options = IngestOptions(layer_type=args.type, resolution=parse_resolution(args.resolution),
                            voxel_offset=parse_triple(args.voxel_offset, "--voxel-offset", positive=False),
                            chunk_size=parse_triple(args.chunk_size, "--chunk-size"), encoding=args.encoding,
                            overwrite=args.overwrite)
    return [IngestStage(src=args.src, dest=args.layer, options=options)]


register_command(StageCommand("ingest", "sections -> precomputed layer (one task per chunk-aligned z-slab)",
                              _add_arguments, _stages, ("slabs",)))
