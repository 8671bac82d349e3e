"""Taking back what a failed stage left that reads as data but holds none.

igneous writes a downsample's new scales into the info when it makes the tasks, and an ingest
writes the info before its first chunk: when every task of such a scale or layer fails, a viewer
is left showing an empty mip (or an empty layer) as if it were real. The runner calls these after
a stage fails (`Stage.after_failure`); anything with at least one chunk is left alone.
"""

from __future__ import annotations

import json

from exaconnect.precomputed.layers import layer_url, read_info


def _has_chunks(url: str, key: str) -> bool:
    from cloudfiles import CloudFiles

    for name in CloudFiles(url).list(prefix=f"{key}/"):
        if not name.rsplit("/", 1)[-1].startswith("."):
            return True
    return False


def drop_empty_top_mips(layer: str, above: int) -> list[str]:
    """Remove, from the top down, the scales above mip `above` that hold no chunk; returns their keys."""
    from cloudfiles import CloudFiles

    url = layer_url(layer)
    info = read_info(url)
    if info is None:
        return []
    scales, removed = info["scales"], []
    while len(scales) > above + 1 and not _has_chunks(url, scales[-1]["key"]):
        removed.append(scales.pop()["key"])
    if removed:
        CloudFiles(url).put("info", json.dumps(info, indent=2).encode(), content_type="application/json",
                            compress=None, cache_control="no-cache")
    return removed


def drop_empty_layer(layer: str) -> bool:
    """Remove the info of a layer none of whose scales holds a chunk (so it no longer opens as an
    empty volume); True when it was removed."""
    from cloudfiles import CloudFiles

    url = layer_url(layer)
    info = read_info(url)
    if info is None or any(_has_chunks(url, scale["key"]) for scale in info["scales"]):
        return False
    CloudFiles(url).delete(["info", "provenance"])
    return True
