"""HTTP details of serving precomputed files: content types, encodings the client accepts, ranges."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from exaconnect.errors import ExaconnectError

# neuroglancer's own static server map (neuroglancer/static/__init__.py), plus data files.
_STATIC_TYPES = {
    ".css": "text/css",
    ".js": "application/javascript",
    ".html": "text/html; charset=utf-8",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".json": "application/json",
}
# Precomputed JSON files without an extension: layer/mesh `info`, `provenance`, and legacy
# mesh manifests named `<segment id>:<lod>`.
_JSON_NAMES = re.compile(r"^(info|provenance|\d+:\d+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(ExaconnectError):
    """A Range header outside the file (answered with 416 and `Content-Range: bytes */SIZE`)."""

    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size


def content_type(name: str) -> str:
    suffix = Path(name).suffix
    if suffix in _STATIC_TYPES:
        return _STATIC_TYPES[suffix]
    if _JSON_NAMES.match(name):
        return "application/json"
    return "application/octet-stream"


def accepts(accept_encoding: str | None, encoding: str) -> bool:
    """Whether an Accept-Encoding header allows `encoding` (q=0 refuses it)."""
    for item in (accept_encoding or "").split(","):
        token, _, params = item.strip().partition(";")
        if token.strip().lower() in (encoding, "*"):
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def decode(data: bytes, encoding: str) -> bytes:
    """Decompress for a client that does not accept the stored encoding (e.g. br over plain http)."""
    if encoding == "gzip":
        return gzip.decompress(data)
    import brotli  # a cloud-volume dependency

    return brotli.decompress(data)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, stop) of a single `Range: bytes=` request, None for no/unsupported range.

    neuroglancer reads sharded precomputed files (shard indexes, minishards) with such ranges;
    multi-range requests are answered with the whole file, which HTTP allows.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        start, stop = max(0, size - int(last)), size
    else:
        start = int(first)
        stop = size if last == "" else min(size, int(last) + 1)
    if start >= size or stop <= start:
        raise RangeNotSatisfiable(f"Range {header!r} is outside the file of {size} bytes", size)
    return start, stop
