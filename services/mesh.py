"""Meshing: igneous's MeshTask (marching cubes per task box, "forge") then the manifest step
("merge") that lists each object's fragments, giving meshes neuroglancer loads directly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from exaconnect.precomputed.bbox import parse_triple
from exaconnect.precomputed.layers import LayerUrl, Provenance, add_provenance, layer_url, open_layer
from exaconnect.precomputed.verify import require_complete
from exaconnect.services.stages import (Stage, StageCommand, at_least, add_allow_missing_argument, layer_argument,
                                        register_command)


def create_mesh_forge_tasks(layer: str, mip: int = 0, shape: tuple[int, int, int] = (256, 256, 256),
                            simplification_error: float = 40.0, dust_threshold: int | None = None,
                            allow_missing: bool = False) -> list:
    """Mesh fragment tasks. A segmentation with missing chunks is refused unless `allow_missing`
    (a hole read as zeros would silently cut objects); a damaged chunk fails its task by name."""
    import igneous.task_creation as tc

    url = layer_url(layer)
    vol = open_layer(url, mip=mip, layer_type="segmentation")
    require_complete(url, mip, None, "mesh", allow_missing)
    tasks = list(tc.create_meshing_tasks(url, mip=mip, shape=tuple(shape), max_simplification_error=simplification_error,
                                         dust_threshold=dust_threshold, fill_missing=allow_missing))
    # after igneous's own record (committed when its iterator is exhausted), so both survive
    add_provenance(vol, Provenance("mesh", {"mip": mip, "shape": list(shape), "simplification_error": simplification_error,
                                            "allow_missing": allow_missing}, [url]))
    return tasks


def create_mesh_merge_tasks(layer: str, magnitude: int = 1):
    """One manifest task for a local layer (it lists the directory); `magnitude` digits of id
    prefixes per task for object stores."""
    import igneous.task_creation as tc

    url = layer_url(layer)
    open_layer(url, layer_type="segmentation")
    return list(tc.create_mesh_manifest_tasks(url, magnitude=magnitude))


@dataclass(frozen=True)
class MeshForge(Stage):
    """Mesh fragments per task box (igneous's MeshTask)."""

    service: ClassVar[str] = "mesh"
    stage_name: ClassVar[str] = "mesh.forge"
    description: ClassVar[str] = "mesh fragments per box"
    layer: LayerUrl
    mip: int = 0
    shape: tuple[int, int, int] = (256, 256, 256)
    simplification_error: float = 40.0
    allow_missing: bool = False

    def make_tasks(self) -> list:
        return create_mesh_forge_tasks(self.layer, mip=self.mip, shape=self.shape,
                                       simplification_error=self.simplification_error, allow_missing=self.allow_missing)

    def reads(self) -> tuple[str, ...]:
        return (self.layer,)

    def writes(self) -> tuple[str, ...]:
        return (f"{self.layer}/mesh",)


@dataclass(frozen=True)
class MeshMerge(Stage):
    """The manifests that list each object's fragments."""

    service: ClassVar[str] = "mesh"
    stage_name: ClassVar[str] = "mesh.merge"
    description: ClassVar[str] = "mesh manifests"
    forge: MeshForge

    def requires(self) -> tuple[Stage, ...]:
        return (self.forge,)

    def make_tasks(self) -> list:
        return create_mesh_merge_tasks(self.forge.layer)

    def reads(self) -> tuple[str, ...]:
        return (f"{self.forge.layer}/mesh",)

    def writes(self) -> tuple[str, ...]:
        return (f"{self.forge.layer}/mesh",)


def mesh_stages(forge: MeshForge) -> list[Stage]:
    """forge, then merge."""
    return [forge, MeshMerge(forge=forge, name=forge.name.replace("forge", "merge"))]


def _add_arguments(v) -> None:
    v.add_argument("segmentation_layer", type=layer_argument, help="segmentation layer (path or URL)")
    v.add_argument("--mip", type=at_least(0), default=0)
    v.add_argument("--shape", default="256,256,256", help="task box X,Y,Z")
    v.add_argument("--simplification-error", type=at_least(0, float), default=40.0, help="nm")
    add_allow_missing_argument(v)


def _stages(args) -> list[Stage]:
    return mesh_stages(MeshForge(layer=args.segmentation_layer, mip=args.mip, shape=parse_triple(args.shape, "--shape"),
                                 simplification_error=args.simplification_error, allow_missing=args.allow_missing))


register_command(StageCommand("mesh", "meshes per object (marching cubes per box, then manifests)", _add_arguments,
                              _stages, ("forge", "merge")))
