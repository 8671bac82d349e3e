"""Skeletons: kimimaro TEASAR skeletons per task box through igneous's SkeletonTask ("forge"),
then UnshardedSkeletonMergeTask joins the fragments of each object ("merge") into the
precomputed skeleton format."""

from __future__ import annotations

from exaconnect.precomputed.layers import Provenance, add_provenance, layer_url, open_layer


def create_skeleton_forge_tasks(layer: str, mip: int = 0, shape: tuple[int, int, int] = (256, 256, 256),
                                scale: float = 4.0, const: float = 100.0, dust_threshold: int = 500):
    """TEASAR's invalidation radius is scale * boundary distance + const (in nm): with 10 nm
    voxels, const=100 nm keeps small branches without spurs on noisy boundaries."""
    import igneous.task_creation as tc

    url = layer_url(layer)
    vol = open_layer(url, mip=mip, layer_type="segmentation")
    tasks = tc.create_skeletonizing_tasks(url, mip=mip, shape=tuple(shape), teasar_params={"scale": scale, "const": const},
                                          dust_threshold=dust_threshold, fill_missing=True)
    add_provenance(vol, Provenance("skeletonize", {"mip": mip, "shape": list(shape), "scale": scale, "const": const}, [url]))
    return tasks


def create_skeleton_merge_tasks(layer: str, magnitude: int = 1, dust_threshold: int = 0, tick_threshold: float = 0):
    import igneous.task_creation as tc

    url = layer_url(layer)
    open_layer(url, layer_type="segmentation")
    return list(tc.create_unsharded_skeleton_merge_tasks(url, magnitude=magnitude, dust_threshold=dust_threshold,
                                                         tick_threshold=tick_threshold))
