"""Meshing: igneous's MeshTask (marching cubes per task box, "forge") then the manifest step
("merge") that lists each object's fragments, giving meshes neuroglancer loads directly."""

from __future__ import annotations

from exaconnect.precomputed.layers import Provenance, add_provenance, layer_url, open_layer
from exaconnect.precomputed.verify import require_complete


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


def mesh_stages(layer: str, requires: tuple[str, ...] = (), prefix: str = "mesh", mip: int = 0,
                shape: tuple[int, int, int] = (256, 256, 256), simplification_error: float = 40.0,
                allow_missing: bool = False) -> list:
    """`PREFIX.forge` (fragments per task box) then `PREFIX.merge` (manifests) as runner stages."""
    from exaconnect.services.stages import Stage

    url = layer_url(layer)
    parameters = {"layer": url, "mip": mip, "shape": list(shape), "simplification_error": simplification_error,
                  "allow_missing": allow_missing}
    forge = Stage(f"{prefix}.forge", "mesh",
                  lambda: create_mesh_forge_tasks(url, mip=mip, shape=shape, simplification_error=simplification_error,
                                                  allow_missing=allow_missing),
                  requires, reads=(url,), writes=(f"{url}/mesh",), parameters=parameters,
                  description="mesh fragments per box")
    merge = Stage(f"{prefix}.merge", "mesh", lambda: create_mesh_merge_tasks(url), (forge.name,), reads=(f"{url}/mesh",),
                  writes=(f"{url}/mesh",), parameters=parameters, description="mesh manifests")
    return [forge, merge]
