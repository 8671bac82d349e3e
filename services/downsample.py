"""Downsample: an image pyramid through igneous's DownsampleTask (averaging for images, the mode
for segmentation: igneous picks by layer type), enqueued on our queue."""

from __future__ import annotations

from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.layers import Provenance, add_provenance, chunk_compression, layer_url, open_layer


def create_downsample_tasks(layer: str, num_mips: int = 2, mip: int = 0, bbox: Box | None = None,
                            factor: tuple[int, int, int] = (2, 2, 2), memory_target: int | None = None):
    """Tasks writing mips mip+1 .. mip+num_mips. Isotropic EM (FIB-SEM) wants (2,2,2); serial
    sections with thick z want (2,2,1). `memory_target` (bytes per task) sets the task size:
    igneous's default (3.5 GB) makes one task of a small volume."""
    import igneous.task_creation as tc
    from cloudvolume.lib import Bbox

    url = layer_url(layer)
    vol = open_layer(url, mip=mip)
    bounds = Bbox(bbox.start, bbox.stop) if bbox else None
    tasks = tc.create_downsampling_tasks(
        url, mip=mip, num_mips=num_mips, factor=tuple(factor), bounds=bounds, fill_missing=True,
        compress=chunk_compression(url), **({"memory_target": memory_target} if memory_target else {}),
    )
    add_provenance(vol, Provenance("downsample", {"mip": mip, "num_mips": num_mips, "factor": list(factor)}, [url]))
    return tasks
