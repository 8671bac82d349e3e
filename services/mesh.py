"""Meshing: igneous's MeshTask (marching cubes per task box, "forge") then the manifest step
("merge") that lists each object's fragments, giving meshes neuroglancer loads directly."""

from __future__ import annotations

from exaconnect.precomputed.layers import Provenance, add_provenance, layer_url, open_layer


def create_mesh_forge_tasks(layer: str, mip: int = 0, shape: tuple[int, int, int] = (256, 256, 256),
                            simplification_error: float = 40.0, dust_threshold: int | None = None):
    import igneous.task_creation as tc

    url = layer_url(layer)
    vol = open_layer(url, mip=mip, layer_type="segmentation")
    tasks = tc.create_meshing_tasks(url, mip=mip, shape=tuple(shape), max_simplification_error=simplification_error,
                                    dust_threshold=dust_threshold, fill_missing=True)
    add_provenance(vol, Provenance("mesh", {"mip": mip, "shape": list(shape), "simplification_error": simplification_error}, [url]))
    return tasks


def create_mesh_merge_tasks(layer: str, magnitude: int = 1):
    """One manifest task for a local layer (it lists the directory); `magnitude` digits of id
    prefixes per task for object stores."""
    import igneous.task_creation as tc

    url = layer_url(layer)
    open_layer(url, layer_type="segmentation")
    return list(tc.create_mesh_manifest_tasks(url, magnitude=magnitude))
