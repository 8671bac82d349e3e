"""Downsample: an image pyramid through igneous's DownsampleTask (averaging for images, the mode
for segmentation: igneous picks by layer type), enqueued on our queue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.bbox import Box, parse_triple, require_inside
from exaconnect.precomputed.layers import (LayerUrl, Provenance, add_provenance, chunk_compression, layer_bounds,
                                           layer_url, open_layer)
from exaconnect.precomputed.verify import require_complete
from exaconnect.services.stages import (Stage, StageCommand, at_least, add_allow_missing_argument, layer_argument,
                                        register_command)

if TYPE_CHECKING:
    from exaconnect.precomputed.empty_outputs import TakenBack


def create_downsample_tasks(layer: str, num_mips: int = 2, mip: int = 0, bbox: Box | None = None,
                            factor: tuple[int, int, int] = (2, 2, 2), memory_target: int | None = None,
                            allow_missing: bool = False) -> list:
    """Tasks writing mips mip+1 .. mip+num_mips. Isotropic EM (FIB-SEM) wants (2,2,2); serial
    sections with thick z want (2,2,1). `memory_target` (bytes per task) sets the task size:
    igneous's default (3.5 GB) makes one task of a small volume.

    Everything is checked before igneous adds the new mips to the info: `bbox` (mip-0 voxels)
    must lie inside the layer, and the input mip must have every chunk of it unless
    `allow_missing` (then missing chunks are read as zeros, and only then)."""
    import igneous.task_creation as tc
    from cloudvolume.lib import Bbox

    url = layer_url(layer)
    if int(num_mips) < 1:
        raise InputError(f"downsample of {url}: --num-mips {num_mips}; expected at least 1 mip to make")
    vol = open_layer(url, mip=mip)
    if bbox is not None:
        require_inside(bbox, layer_bounds(vol), f"--bbox for downsampling {url}")
    require_complete(url, mip, bbox, "downsample", allow_missing)
    bounds = Bbox(bbox.start, bbox.stop) if bbox else None
    tasks = list(tc.create_downsampling_tasks(
        url, mip=mip, num_mips=num_mips, factor=tuple(factor), bounds=bounds, fill_missing=allow_missing,
        compress=chunk_compression(url), **({"memory_target": memory_target} if memory_target else {}),
    ))
    _require_a_new_mip(url, vol, mip, tuple(factor))
    # igneous commits its own provenance record once its task iterator is exhausted, from the copy
    # it loaded before; ours is appended after that, to the stored file, so both survive.
    add_provenance(vol, Provenance("downsample", {"mip": mip, "num_mips": num_mips, "factor": list(factor),
                                                  "bbox": str(bbox) if bbox else None,
                                                  "allow_missing": allow_missing}, [url]))
    return tasks


def _require_a_new_mip(url: str, vol, mip: int, factor: tuple[int, int, int]) -> None:
    """igneous makes no mip, and only says so on stdout, when some downsampled axis spans fewer
    than `factor` chunks; its tasks would then write nothing and the stage would pass as done."""
    from exaconnect.precomputed.layers import read_info

    scales = (read_info(url) or {}).get("scales", [])
    wanted = [float(r) * f for r, f in zip(scales[mip]["resolution"], factor)] if len(scales) > mip else None
    if len(scales) > mip + 1 and wanted is not None and all(
            abs(float(a) - b) < 1e-3 * max(1.0, b) for a, b in zip(scales[mip + 1]["resolution"], wanted)):
        return
    size = [int(v) for v in vol.meta.volume_size(mip)]
    chunk = [int(v) for v in vol.meta.chunk_size(mip)]
    short = [f"{axis} ({s} voxels = {s / c:g} chunks of {c}, factor {f})"
             for axis, s, c, f in zip("xyz", size, chunk, factor) if f != 1 and s < f * c]
    why = ("along " + ", ".join(short) + " there are fewer chunks than the factor") if short else \
        "igneous generated no scale for it"
    raise LayerError(f"downsample of {url}: no mip can be made from mip {mip} ({size[0]}x{size[1]}x{size[2]} voxels "
                     f"in {chunk[0]}x{chunk[1]}x{chunk[2]} chunks, factor {','.join(map(str, factor))}): {why}; "
                     "expected a layer at least factor x chunk size along each downsampled axis (or a smaller "
                     "--factor on that axis, or --num-mips only as many as fit)")


@dataclass(frozen=True)
class DownsampleStage(Stage):
    """A pyramid of `layer` (`allow_missing`: see `create_downsample_tasks`)."""

    service: ClassVar[str] = "downsample"
    stage_name: ClassVar[str] = "downsample.pyramid"
    description: ClassVar[str] = "image pyramid"
    layer: LayerUrl
    num_mips: int = 2
    mip: int = 0
    bbox: Box | None = None
    factor: tuple[int, int, int] = (2, 2, 2)
    allow_missing: bool = False

    def make_tasks(self) -> list:
        return list(create_downsample_tasks(self.layer, num_mips=self.num_mips, mip=self.mip, bbox=self.bbox,
                                            factor=self.factor, allow_missing=self.allow_missing))

    def reads(self) -> tuple[str, ...]:
        return (self.layer,)

    def writes(self) -> tuple[str, ...]:
        return (self.layer,)

    def after_failure(self) -> TakenBack | None:
        from exaconnect.precomputed.empty_outputs import drop_empty_top_mips

        return drop_empty_top_mips(self.layer, self.mip)


def _add_arguments(v) -> None:
    v.add_argument("layer", type=layer_argument, help="layer (path or URL)")
    v.add_argument("--num-mips", type=int, default=2)
    v.add_argument("--mip", type=at_least(0), default=0, help="mip to start from")
    v.add_argument("--factor", default="2,2,2", help="X,Y,Z per mip (2,2,1 for thick serial sections)")
    v.add_argument("--bbox", default=None, help="x0,y0,z0,x1,y1,z1 in mip-0 voxels")
    add_allow_missing_argument(v)


def _stages(args) -> list[Stage]:
    return [DownsampleStage(layer=args.layer, num_mips=args.num_mips, mip=args.mip,
                            bbox=Box.parse(args.bbox) if args.bbox else None,
                            factor=parse_triple(args.factor, "--factor"), allow_missing=args.allow_missing)]


register_command(StageCommand("downsample", "image pyramid: mean for images, mode for labels", _add_arguments,
                              _stages, ("pyramid",)))
