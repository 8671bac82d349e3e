"""Downsample: an image pyramid through igneous's DownsampleTask (averaging for images, the mode
for segmentation: igneous picks by layer type), enqueued on our queue."""

from __future__ import annotations

from exaconnect.precomputed.bbox import Box, require_inside
from exaconnect.precomputed.layers import (Provenance, add_provenance, chunk_compression, layer_bounds, layer_url,
                                           open_layer)
from exaconnect.precomputed.verify import require_complete


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
    vol = open_layer(url, mip=mip)
    if bbox is not None:
        require_inside(bbox, layer_bounds(vol), f"--bbox for downsampling {url}")
    require_complete(url, mip, bbox, "downsample", allow_missing)
    bounds = Bbox(bbox.start, bbox.stop) if bbox else None
    tasks = list(tc.create_downsampling_tasks(
        url, mip=mip, num_mips=num_mips, factor=tuple(factor), bounds=bounds, fill_missing=allow_missing,
        compress=chunk_compression(url), **({"memory_target": memory_target} if memory_target else {}),
    ))
    # igneous commits its own provenance record once its task iterator is exhausted, from the copy
    # it loaded before; ours is appended after that, to the stored file, so both survive.
    add_provenance(vol, Provenance("downsample", {"mip": mip, "num_mips": num_mips, "factor": list(factor),
                                                  "bbox": str(bbox) if bbox else None,
                                                  "allow_missing": allow_missing}, [url]))
    return tasks


def downsample_stage(layer: str, name: str, requires: tuple[str, ...] = (), num_mips: int = 2, mip: int = 0,
                     bbox: Box | None = None, factor: tuple[int, int, int] = (2, 2, 2), allow_missing: bool = False):
    """A pyramid of `layer` as a runner stage (`allow_missing`: see `create_downsample_tasks`)."""
    from exaconnect.services.stages import Stage

    url = layer_url(layer)
    return Stage(name, "downsample",
                 lambda: list(create_downsample_tasks(url, num_mips=num_mips, mip=mip, bbox=bbox, factor=factor,
                                                      allow_missing=allow_missing)),
                 requires, reads=(url,), writes=(url,),
                 parameters={"layer": url, "num_mips": num_mips, "mip": mip, "factor": list(factor),
                             "bbox": bbox.to_list() if bbox else None, "allow_missing": allow_missing},
                 description="image pyramid")
