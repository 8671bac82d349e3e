"""Taking back what a failed stage left that reads as data but holds none, and putting it back.

igneous writes a downsample's new scales into the info when it makes the tasks, and an ingest
writes the info before its first chunk: when every task of such a scale or layer fails, a viewer
is left showing an empty mip (or an empty layer) as if it were real. The runner calls these after
a stage failed (`Stage.after_failure`); anything with at least one chunk is left alone.

The failed tasks were made for the structure taken back, and `queue dead-letters requeue` gives
them another chance: so what is taken back is returned as a `TakenBack` (the files' text before
and after), which the runner keeps beside the queue's dead letters and the requeue restores
(`restore`) before the tasks run again. A restore only writes where the files still read as the
clean-up left them: if anything rewrote the layer since, the newer files win.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from exaconnect.precomputed.layers import layer_url, read_info


@dataclass(frozen=True)
class TakenBack:
    """Files of one layer changed by a clean-up: name -> (text before, text after; None = absent)."""

    url: str
    what: str
    files: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"url": self.url, "what": self.what,
                "files": {name: {"before": before, "after": after} for name, (before, after) in self.files.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "TakenBack":
        return cls(str(data["url"]), str(data["what"]),
                   {name: (f.get("before"), f.get("after")) for name, f in dict(data["files"]).items()})


def _read_text(url: str, name: str) -> str | None:
    from cloudfiles import CloudFiles

    data = CloudFiles(url).get(name)
    return None if data is None else data.decode()


def _write_text(url: str, name: str, text: str | None) -> None:
    from cloudfiles import CloudFiles

    files = CloudFiles(url)
    if text is None:
        files.delete(name)
    else:
        files.put(name, text.encode(), content_type="application/json", compress=None, cache_control="no-cache")


def _has_chunks(url: str, key: str) -> bool:
    from cloudfiles import CloudFiles

    for name in CloudFiles(url).list(prefix=f"{key}/"):
        if not name.rsplit("/", 1)[-1].startswith("."):
            return True
    return False


def drop_empty_top_mips(layer: str, above: int) -> TakenBack | None:
    """Remove, from the top down, the scales above mip `above` that hold no chunk."""
    url = layer_url(layer)
    before = _read_text(url, "info")
    info = read_info(url)
    if before is None or info is None:
        return None
    scales, removed = info["scales"], []
    while len(scales) > above + 1 and not _has_chunks(url, scales[-1]["key"]):
        removed.append(scales.pop()["key"])
    if not removed:
        return None
    after = json.dumps(info, indent=2)
    _write_text(url, "info", after)
    return TakenBack(url, f"the info no longer lists the mips that got no chunk ({', '.join(removed)})",
                     {"info": (before, after)})


def drop_empty_layer(layer: str) -> TakenBack | None:
    """Remove the info (and provenance) of a layer none of whose scales holds a chunk, so it no
    longer opens as an empty volume."""
    url = layer_url(layer)
    info = read_info(url)
    if info is None or any(_has_chunks(url, scale["key"]) for scale in info["scales"]):
        return None
    files = {name: (_read_text(url, name), None) for name in ("info", "provenance")}
    for name in files:
        _write_text(url, name, None)
    return TakenBack(url, f"layer {url} got no chunk and its info was removed",
                     {name: change for name, change in files.items() if change[0] is not None})


def restore(taken: TakenBack) -> bool:
    """Put back what `taken` took, where the layer still reads as the clean-up left it; True when
    it was put back."""
    if any(_read_text(taken.url, name) != after for name, (_, after) in taken.files.items()):
        return False
    for name, (before, _) in taken.files.items():
        _write_text(taken.url, name, before)
    return True
