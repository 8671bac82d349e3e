"""Completeness and integrity of a layer's chunk files: which are missing, which are damaged.

Three checks, from cheap to thorough:

- `missing_chunks`: which chunk files of a region do not exist (a listing; what a stage checks
  before it starts, so that a hole in its input is not read as zeros).
- `record_checksums`: after a task writes a box, it reads the box's chunk files back, checks
  them as a reader would (`chunks.chunk_problem`) and stores their MD5s in a small manifest,
  `checksums/<mip key>/<box>.json`, one per task, so that later bit rot or a partial overwrite
  of a chunk that still parses is detected too.
- `verify_layer`: every chunk of a region: present, decodable, and equal to its manifest entry
  when one exists (`exaconnect layer verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.bbox import Box, chunk_boxes, parse_chunk_name
from exaconnect.precomputed.checksums import forget_cached_manifests
from exaconnect.precomputed.chunks import chunk_problem
from exaconnect.precomputed.layers import chunk_name, layer_bounds, layer_url, local_path, mip_bounds, open_layer

MANIFEST_DIR = "checksums"
_BATCH = 256
_COMPRESSED_SUFFIXES = (".gz", ".br", ".zstd", ".zst")


def region_at_mip(vol, bbox: Box | None, mip: int) -> Box:
    """`bbox` (mip-0 voxels) at `mip`, clipped to the layer; the whole layer at that mip if None."""
    bounds = mip_bounds(vol, mip)
    if bbox is None:
        return bounds
    from cloudvolume.lib import Bbox

    scaled = vol.meta.bbox_to_mip(Bbox(bbox.start, bbox.stop), 0, mip)
    region = Box(tuple(int(v) for v in scaled.minpt), tuple(int(v) for v in scaled.maxpt))  # type: ignore[arg-type]
    return region.intersection(bounds)


def expected_chunks(vol, mip: int, bbox: Box | None = None) -> list[str]:
    """Names (relative to the layer) of every chunk file holding a voxel of `bbox` at `mip`."""
    bounds = mip_bounds(vol, mip)
    chunk = tuple(int(c) for c in vol.meta.chunk_size(mip))
    return [chunk_name(vol, box, mip) for box in chunk_boxes(region_at_mip(vol, bbox, mip), bounds, chunk)]


def _existing(url: str, names: list[str]) -> set[str]:
    path = local_path(url)
    if path is not None:
        found: set[str] = set()
        for key in {name.split("/")[0] for name in names}:
            folder = os.path.join(path, key)
            if os.path.isdir(folder):
                for entry in os.listdir(folder):
                    for suffix in _COMPRESSED_SUFFIXES:
                        if entry.endswith(suffix):
                            entry = entry[: -len(suffix)]
                    found.add(f"{key}/{entry}")
        return found & set(names)
    from cloudfiles import CloudFiles

    exists = CloudFiles(url).exists(names)
    return {name for name, present in exists.items() if present}


def missing_chunks(layer: str, mip: int = 0, bbox: Box | None = None) -> list[str]:
    """Chunk files of `bbox` (mip-0 voxels; default the whole layer) at `mip` that do not exist."""
    vol = open_layer(layer, mip=mip)
    names = expected_chunks(vol, mip, bbox)
    present = _existing(vol.cloudpath, names)
    return [name for name in names if name not in present]


def require_complete(layer: str, mip: int, bbox: Box | None, stage: str, allow_missing: bool = False) -> None:
    """Refuse to start `stage` on an input with holes, unless told that holes are expected."""
    if allow_missing:
        return
    missing = missing_chunks(layer, mip, bbox)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise LayerError(
            f"{stage}: input layer {layer_url(layer)} is missing {len(missing)} chunk(s) at mip {mip} ({shown}); "
            "expected a complete input (rerun the stage that writes it, or pass --allow-missing to read them as zeros)"
        )


def _manifest_name(vol, box: Box, mip: int) -> str:
    (x0, y0, z0), (x1, y1, z1) = box.start, box.stop
    return f"{MANIFEST_DIR}/{vol.meta.key(mip)}/{x0}-{x1}_{y0}-{y1}_{z0}-{z1}.json"


def _chunk_shape(vol, name: str, mip: int) -> list[int]:
    box = parse_chunk_name(name)
    if box is None:
        raise LayerError(f"{name}: not a chunk name (x0-x1_y0-y1_z0-z1)")
    return list(box.shape) + [int(vol.meta.num_channels)]


def _problem(vol, name: str, content: bytes | None, mip: int) -> str:
    if content is None:
        return "missing"
    if len(content) == 0:
        return "empty file"
    return chunk_problem(content, vol.meta.encoding(mip), _chunk_shape(vol, name, mip), vol.meta.dtype,
                         vol.meta.compressed_segmentation_block_size(mip) or (8, 8, 8))


def record_checksums(vol, box: Box, mip: int | None = None, present_only: bool = False) -> dict[str, str]:
    """Read back the chunks a task wrote for `box` (at `mip`), check them and store their MD5s.

    Raises DamagedChunkError-like LayerError when a chunk just written does not read back;
    `present_only` skips chunks that do not exist (a writer that may leave some out, as igneous
    does for mips its task shape cannot fill).
    """
    from cloudfiles import CloudFiles

    mip = vol.mip if mip is None else mip
    bounds = mip_bounds(vol, mip)
    chunk = tuple(int(c) for c in vol.meta.chunk_size(mip))
    names = [chunk_name(vol, b, mip) for b in chunk_boxes(box, bounds, chunk)]
    cf = CloudFiles(vol.cloudpath)
    sums: dict[str, str] = {}
    for item in cf.get(names):
        if present_only and item["content"] is None:
            continue
        problem = _problem(vol, item["path"], item["content"], mip)
        if problem:
            raise LayerError(f"chunk {vol.cloudpath}/{item['path']} does not read back after writing: {problem}")
        sums[item["path"]] = hashlib.md5(item["content"]).hexdigest()
    manifest = {"box": box.to_list(), "mip": mip, "written": time.time(), "chunks": dict(sorted(sums.items()))}
    cf.put(_manifest_name(vol, box, mip), json.dumps(manifest, indent=0).encode(), compress=None,
           content_type="application/json")
    forget_cached_manifests()  # this process's own later reads see the new checksums
    return sums


def _manifests(vol, mip: int) -> dict[str, str]:
    from cloudfiles import CloudFiles

    cf = CloudFiles(vol.cloudpath)
    prefix = f"{MANIFEST_DIR}/{vol.meta.key(mip)}/"
    manifests = []
    for item in cf.get(list(cf.list(prefix=prefix))):
        try:
            manifest = json.loads(item["content"])
            manifests.append((float(manifest.get("written", 0)), dict(manifest["chunks"])))
        except (ValueError, KeyError, TypeError):
            continue  # an unreadable manifest only loses its checksums; the chunks are still parsed
    sums: dict[str, str] = {}
    # A chunk rewritten by a later box (an edge chunk shared by two interactive boxes) keeps the
    # checksum of its latest write.
    for _, chunks in sorted(manifests, key=lambda m: m[0]):
        sums.update(chunks)
    return sums


def _decompressed(item: dict) -> tuple[bytes | None, str]:
    """A chunk fetched raw, decompressed here so that a damaged gzip stream is one chunk's
    problem in the report rather than an exception that ends the whole check."""
    from cloudfiles import compression

    from exaconnect.precomputed.chunks import decompression_errors

    if item.get("error") is not None:
        return None, f"cannot be read ({item['error']})"
    content = item["content"]
    if content is None or not item.get("compress"):
        return content, ""
    try:
        return compression.decompress(content, item["compress"], filename=item["path"]), ""
    except decompression_errors() as exc:
        return None, f"cannot decompress it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


@dataclass
class MipReport:
    mip: int
    chunks: int = 0
    missing: list[str] = field(default_factory=list)
    damaged: list[dict] = field(default_factory=list)
    checked_against_manifest: int = 0

    def as_dict(self) -> dict:
        return {"mip": self.mip, "chunks": self.chunks, "missing": self.missing, "damaged": self.damaged,
                "checked_against_manifest": self.checked_against_manifest}


def _batches(items: list[str], size: int = _BATCH) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def verify_layer(layer: str, mips: Iterable[int] | None = None, bbox: Box | None = None) -> dict:
    """Every chunk of `bbox` (mip-0 voxels; default the whole layer) at each of `mips` (default
    all): missing, damaged (cannot be decoded as the layer's encoding, or differs from the MD5 its
    writer recorded). Returns a JSON-able report with `ok` false when anything is wrong."""
    from cloudfiles import CloudFiles

    url = layer_url(layer)
    vol = open_layer(url)
    available = list(range(len(vol.info["scales"])))
    mips = available if mips is None else [int(m) for m in mips]
    for mip in mips:
        if mip not in available:
            raise InputError(f"--mip {mip}: layer {url} has mips {available[0]}..{available[-1]}")
    if bbox is not None:
        bounds = layer_bounds(vol)
        if bbox.intersection(bounds).empty():
            # "ok" after checking nothing would read as a clean bill for a box never looked at.
            raise InputError(f"--bbox {bbox}: outside layer {url}, whose mip-0 bounds are {bounds}")
    cf = CloudFiles(url)
    reports = []
    for mip in mips:
        report = MipReport(mip)
        names = expected_chunks(vol, mip, bbox)
        report.chunks = len(names)
        sums = _manifests(vol, mip)
        present = _existing(url, names)
        report.missing = [n for n in names if n not in present]
        for batch in _batches([n for n in names if n in present]):
            for item in cf.get(batch, raw=True):
                name, content, problem = item["path"], *_decompressed(item)
                problem = problem or _problem(vol, name, content, mip)
                if not problem and name in sums:
                    report.checked_against_manifest += 1
                    if hashlib.md5(content).hexdigest() != sums[name]:
                        problem = "checksum differs from the one recorded when it was written"
                if problem == "missing":
                    report.missing.append(name)
                elif problem:
                    report.damaged.append({"chunk": name, "problem": problem})
        report.missing.sort()
        reports.append(report)
    ok = not any(r.missing or r.damaged for r in reports)
    return {"layer": url, "bbox": str(bbox) if bbox else None, "ok": ok, "mips": [r.as_dict() for r in reports]}
