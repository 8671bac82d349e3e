"""Skeletons: kimimaro TEASAR skeletons per task box through igneous's SkeletonTask ("forge"),
then UnshardedSkeletonMergeTask joins the fragments of each object ("merge") into the
precomputed skeleton format."""

from __future__ import annotations

from exaconnect.precomputed.layers import Provenance, add_provenance, layer_url, open_layer
from exaconnect.precomputed.verify import require_complete


def create_skeleton_forge_tasks(layer: str, mip: int = 0, shape: tuple[int, int, int] = (256, 256, 256),
                                scale: float = 4.0, const: float = 100.0, dust_threshold: int = 500,
                                allow_missing: bool = False) -> list:
    """TEASAR's invalidation radius is scale * boundary distance + const (in nm): with 10 nm
    voxels, const=100 nm keeps small branches without spurs on noisy boundaries. A segmentation
    with missing chunks is refused unless `allow_missing`."""
    import igneous.task_creation as tc

    url = layer_url(layer)
    vol = open_layer(url, mip=mip, layer_type="segmentation")
    require_complete(url, mip, None, "skeletonize", allow_missing)
    tasks = list(tc.create_skeletonizing_tasks(url, mip=mip, shape=tuple(shape), teasar_params={"scale": scale, "const": const},
                                               dust_threshold=dust_threshold, fill_missing=allow_missing))
    # after igneous's own record (committed when its iterator is exhausted), so both survive
    add_provenance(vol, Provenance("skeletonize", {"mip": mip, "shape": list(shape), "scale": scale, "const": const,
                                                   "allow_missing": allow_missing}, [url]))
    return tasks


def create_skeleton_merge_tasks(layer: str, magnitude: int = 1, dust_threshold: int = 0, tick_threshold: float = 0):
    import igneous.task_creation as tc

    url = layer_url(layer)
    open_layer(url, layer_type="segmentation")
    return list(tc.create_unsharded_skeleton_merge_tasks(url, magnitude=magnitude, dust_threshold=dust_threshold,
                                                         tick_threshold=tick_threshold))


def skeleton_stages(layer: str, requires: tuple[str, ...] = (), prefix: str = "skeleton", mip: int = 0,
                    shape: tuple[int, int, int] = (256, 256, 256), scale: float = 4.0, const: float = 100.0,
                    dust_threshold: int = 500, allow_missing: bool = False) -> list:
    """`PREFIX.forge` (kimimaro per task box) then `PREFIX.merge` as runner stages."""
    from exaconnect.services.stages import Stage

    url = layer_url(layer)
    parameters = {"layer": url, "mip": mip, "shape": list(shape), "scale": scale, "const": const,
                  "dust_threshold": dust_threshold, "allow_missing": allow_missing}
    forge = Stage(f"{prefix}.forge", "skeletonize",
                  lambda: create_skeleton_forge_tasks(url, mip=mip, shape=shape, scale=scale, const=const,
                                                      dust_threshold=dust_threshold, allow_missing=allow_missing),
                  requires, reads=(url,), writes=(f"{url}/skeletons",), parameters=parameters,
                  description="skeleton fragments per box")
    merge = Stage(f"{prefix}.merge", "skeletonize", lambda: create_skeleton_merge_tasks(url), (forge.name,),
                  reads=(f"{url}/skeletons",), writes=(f"{url}/skeletons",), parameters=parameters,
                  description="skeleton fragments joined")
    return [forge, merge]
