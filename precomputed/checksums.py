"""Checksums checked on read: a chunk whose bytes still decode (same-length garbage in a raw
chunk, one flipped bit in a compressed_segmentation chunk's packed values) is caught by comparing
its MD5 with the one its writer recorded (`verify.record_checksums`, one manifest per written
box under `checksums/<mip key>/`).

The check runs for every chunk cloud-volume decodes in this process (`chunks.install_chunk_guard`
calls `check_chunk`), for layers that carry manifests; chunks of a layer, or a box, without one
are read unchecked. Manifests are found by the boxes in their names and cached per process; a
mismatch is rechecked against a fresh listing before it is called damage, so that a chunk
rewritten since (with its own newer manifest) is not.

Switch it off with `set_checksum_verification(False)` or EXACONNECT_VERIFY_CHECKSUMS=0 (the
environment reaches worker processes); its cost is measured by bench/bench_integrity.py.

Derived mips: igneous's DownsampleTask writes mips without manifests; `checksum_downsample_output`
wraps its registered function so that a DownsampleTask run from a queue records them too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from typing import Any

from exaconnect.precomputed.bbox import parse_chunk_name

ENV = "EXACONNECT_VERIFY_CHECKSUMS"
MANIFEST_DIR = "checksums"

_lock = threading.Lock()
# (layer URL, mip key) -> [(box start, box stop, manifest name)]; manifest name -> (written, chunks)
_listings: dict[tuple[str, str], list[tuple[tuple[int, ...], tuple[int, ...], str]]] = {}
_manifests: dict[str, tuple[float, dict[str, str]]] = {}


def checksum_verification_enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def set_checksum_verification(enabled: bool) -> None:
    """On or off for this process and the worker processes it starts from now on."""
    os.environ[ENV] = "1" if enabled else "0"


def forget_cached_manifests() -> None:
    with _lock:
        _listings.clear()
        _manifests.clear()


def _parse_box(name: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    box = parse_chunk_name(name)
    return None if box is None else (tuple(box.start), tuple(box.stop))


def _listing(cloudpath: str, key: str):
    with _lock:
        cached = _listings.get((cloudpath, key))
    if cached is not None:
        return cached
    from cloudfiles import CloudFiles

    found = []
    for name in CloudFiles(cloudpath).list(prefix=f"{MANIFEST_DIR}/{key}/"):
        box = _parse_box(name)
        if box is not None:
            found.append((box[0], box[1], name))
    with _lock:
        _listings[(cloudpath, key)] = found
    return found


def _manifest(cloudpath: str, name: str) -> tuple[float, dict[str, str]]:
    cache_key = f"{cloudpath}/{name}"
    with _lock:
        cached = _manifests.get(cache_key)
    if cached is not None:
        return cached
    from cloudfiles import CloudFiles

    try:
        body = json.loads(CloudFiles(cloudpath).get(name) or b"{}")
        value = (float(body.get("written", 0)), dict(body.get("chunks", {})))
    except (ValueError, TypeError, AttributeError):
        value = (0.0, {})  # an unreadable manifest only loses its checksums (verify reports it)
    with _lock:
        _manifests[cache_key] = value
    return value


def recorded_checksum(cloudpath: str, chunk: str) -> str | None:
    """The MD5 the latest writer of `chunk` (KEY/x0-x1_y0-y1_z0-z1) recorded, None if none did."""
    key, _, _ = chunk.rpartition("/")
    box = _parse_box(chunk)
    if box is None or not key:
        return None
    start, stop = box
    best: tuple[float, str] | None = None
    for m_start, m_stop, name in _listing(cloudpath, key):
        if all(a < d and c < b for a, b, c, d in zip(start, stop, m_start, m_stop)):
            written, sums = _manifest(cloudpath, name)
            if chunk in sums and (best is None or written >= best[0]):
                best = (written, sums[chunk])
    return None if best is None else best[1]


def chunk_checksum_status(cloudpath: str, chunk: str, content: bytes | memoryview) -> tuple[str, bool]:
    """(problem, vouched): problem '' when `content` matches the recorded checksum of `chunk` (or
    none is recorded), else why not; vouched when a recorded checksum matched (the bytes are the
    ones its writer's encoder made, so a decoder can trust them)."""
    expected = recorded_checksum(cloudpath, chunk)
    if expected is None:
        return "", False
    actual = hashlib.md5(content).hexdigest()
    if actual == expected:
        return "", True
    with _lock:  # perhaps rewritten since we listed: look again before calling it damage
        _listings.pop((cloudpath, chunk.rpartition("/")[0]), None)
        for name in [n for n in _manifests if n.startswith(cloudpath + "/")]:
            _manifests.pop(name, None)
    expected = recorded_checksum(cloudpath, chunk)
    if expected is None:
        return "", False
    if actual == expected:
        return "", True
    return f"checksum {actual} differs from {expected}, recorded when it was written", False


def check_chunk_status(cloudpath: str, chunk: str, content: Any) -> tuple[str, bool]:
    """The read-time check `install_chunk_guard` runs: (problem, vouched); problem '' unless a
    mismatch, vouched only when verification is on and a recorded checksum matched."""
    if not checksum_verification_enabled() or content is None or len(content) == 0:
        return "", False
    return chunk_checksum_status(cloudpath, chunk, content)


def check_chunk(cloudpath: str, chunk: str, content: Any) -> str:
    """The read-time check: '' unless switched off or a mismatch."""
    return check_chunk_status(cloudpath, chunk, content)[0]


# ---------------------------------------------------------------- derived mips

def checksum_downsample_output() -> None:
    """Wrap igneous's registered DownsampleTask so that, run from a queue, it records manifests
    of the mips it wrote (boxes of higher mips scaled from its own box). Idempotent."""
    try:
        from taskqueue.queueablefns import REGISTRY

        import igneous.tasks.image.image as image_tasks
    except ImportError:  # pragma: no cover - igneous is a dependency
        return
    key = ("igneous.tasks.image.image", "DownsampleTask")
    original = REGISTRY.get(key)
    if original is None or getattr(original, "_exaconnect_checksums", False):
        return

    @functools.wraps(original)
    def downsample_task(layer_path, mip, shape, offset, *args, **kwargs):
        result = original(layer_path, mip, shape, offset, *args, **kwargs)
        if result is not None and hasattr(result, "execute"):
            result.execute()  # igneous returns a TransferTask to run
        _record_derived(kwargs.get("dest_path") or layer_path, int(mip), shape, offset, kwargs.get("max_mips"))
        return None

    downsample_task._exaconnect_checksums = True  # type: ignore[attr-defined]
    REGISTRY[key] = downsample_task
    image_tasks.DownsampleTask = downsample_task


def _record_derived(layer: str, mip: int, shape, offset, max_mips) -> None:
    from cloudvolume.lib import Bbox

    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.layers import mip_bounds, open_layer
    from exaconnect.precomputed.verify import record_checksums

    vol = open_layer(layer, mip=mip)
    last = len(vol.info["scales"]) - 1
    if max_mips is not None:
        last = min(last, mip + int(max_mips))
    start = [int(v) for v in offset][:3]
    source = Bbox(start, [a + int(s) for a, s in zip(start, list(shape)[:3])])
    for target in range(mip + 1, last + 1):
        scaled = vol.meta.bbox_to_mip(source, mip, target)
        box = Box(tuple(int(v) for v in scaled.minpt), tuple(int(v) for v in scaled.maxpt))  # type: ignore[arg-type]
        box = box.intersection(mip_bounds(vol, target))
        if box is None or min(box.shape) <= 0:
            continue
        record_checksums(open_layer(layer, mip=target), box, target, present_only=True)
