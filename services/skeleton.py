"""Skeletons: kimimaro TEASAR skeletons per task box through igneous's SkeletonTask ("forge"),
then UnshardedSkeletonMergeTask joins the fragments of each object ("merge") into the
precomputed skeleton format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from exaconnect.precomputed.bbox import parse_triple
from exaconnect.precomputed.layers import LayerUrl, Provenance, add_provenance, layer_url, open_layer
from exaconnect.precomputed.verify import require_complete
from exaconnect.services.stages import (Stage, StageCommand, at_least, add_allow_missing_argument, layer_argument,
                                        register_command)


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


@dataclass(frozen=True)
class SkeletonForge(Stage):
    """kimimaro skeleton fragments per task box (igneous's SkeletonTask)."""

    service: ClassVar[str] = "skeleton"
    stage_name: ClassVar[str] = "skeleton.forge"
    description: ClassVar[str] = "skeleton fragments per box"
    layer: LayerUrl
    mip: int = 0
    shape: tuple[int, int, int] = (256, 256, 256)
    scale: float = 4.0
    const: float = 100.0
    dust_threshold: int = 500
    allow_missing: bool = False

    def make_tasks(self) -> list:
        return create_skeleton_forge_tasks(self.layer, mip=self.mip, shape=self.shape, scale=self.scale, const=self.const,
                                           dust_threshold=self.dust_threshold, allow_missing=self.allow_missing)

    def reads(self) -> tuple[str, ...]:
        return (self.layer,)

    def writes(self) -> tuple[str, ...]:
        return (f"{self.layer}/skeletons",)


@dataclass(frozen=True)
class SkeletonMerge(Stage):
    """The fragments of each object joined into one skeleton."""

    service: ClassVar[str] = "skeleton"
    stage_name: ClassVar[str] = "skeleton.merge"
    description: ClassVar[str] = "skeleton fragments joined"
    forge: SkeletonForge

    def requires(self) -> tuple[Stage, ...]:
        return (self.forge,)

    def make_tasks(self) -> list:
        return create_skeleton_merge_tasks(self.forge.layer)

    def reads(self) -> tuple[str, ...]:
        return (f"{self.forge.layer}/skeletons",)

    def writes(self) -> tuple[str, ...]:
        return (f"{self.forge.layer}/skeletons",)


def skeleton_stages(forge: SkeletonForge) -> list[Stage]:
    """forge, then merge."""
    return [forge, SkeletonMerge(forge=forge, name=forge.name.replace("forge", "merge"))]


def _add_arguments(v) -> None:
    v.add_argument("segmentation_layer", type=layer_argument, help="segmentation layer (path or URL)")
    v.add_argument("--mip", type=at_least(0), default=0)
    v.add_argument("--shape", default="256,256,256", help="task box X,Y,Z")
    v.add_argument("--scale", type=at_least(0, float), default=4.0, help="TEASAR invalidation: scale * boundary distance + const")
    v.add_argument("--const", type=at_least(0, float), default=100.0, help="nm")
    v.add_argument("--dust-threshold", type=at_least(0), default=500, help="skip objects smaller than this (voxels)")
    add_allow_missing_argument(v)


def _stages(args) -> list[Stage]:
    return skeleton_stages(SkeletonForge(layer=args.segmentation_layer, mip=args.mip,
                                         shape=parse_triple(args.shape, "--shape"), scale=args.scale, const=args.const,
                                         dust_threshold=args.dust_threshold, allow_missing=args.allow_missing))


register_command(StageCommand("skeleton", "kimimaro skeletons per object (per box, then merged)", _add_arguments,
                              _stages, ("forge", "merge")))
