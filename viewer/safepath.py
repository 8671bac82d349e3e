"""Map a request path onto a file inside one served root, refusing anything that could escape it.

Defence in depth, because a viewer server is easy to expose by accident (`--bind 0.0.0.0`):
1. the raw path is refused if it carries a backslash, NUL, or an encoded `/`, `\\`, `%` or NUL
   (`%2f`, `%5c`, `%25`, `%00`: the encoded forms some decoders expand twice);
2. after one percent-decoding, `.` / `..` segments and hidden names (leading `.`) are refused;
3. the joined path is resolved with `os.path.realpath` (following symlinks) and must still lie
   under the resolved root (`os.path.commonpath`), so a symlink pointing outside is refused too.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from exaconnect.errors import ExaconnectError

_FORBIDDEN_ENCODED = ("%2f", "%5c", "%25", "%00")
# cloud-volume writes `chunk.gz` / `chunk.br` when compressing; neuroglancer asks for `chunk`.
_COMPRESSED_SUFFIXES = ((".gz", "gzip"), (".br", "br"))


class PathRefused(ExaconnectError):
    """A request path that tries to leave its root (answered with 403)."""


class PathMissing(ExaconnectError):
    """A request path with no file behind it (answered with 404; neuroglancer reads it as empty)."""


@dataclass(frozen=True)
class ResolvedFile:
    path: Path  # the file on disk, inside the root
    encoding: str | None  # Content-Encoding of its bytes: None, "gzip" or "br"


def split_request_path(raw_path: str) -> list[str]:
    """Decode a URL path (no query) into plain segments, or raise PathRefused."""
    lowered = raw_path.lower()
    if "\\" in raw_path or "\x00" in raw_path or any(code in lowered for code in _FORBIDDEN_ENCODED):
        raise PathRefused(f"request path {raw_path!r} contains an encoded or literal separator")
    try:
        decoded = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError as exc:
        raise PathRefused(f"request path {raw_path!r} is not valid UTF-8 once decoded") from exc
    parts = [part for part in decoded.split("/") if part]
    for part in parts:
        if part in (".", "..") or part.startswith("."):
            raise PathRefused(f"request path {raw_path!r} has a relative or hidden segment {part!r}")
    return parts


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def resolve_file(root: Path, parts: list[str]) -> ResolvedFile:
    """The file for `parts` under `root`, else its `.gz`/`.br` twin; PathRefused if it escapes the root."""
    real_root = os.path.realpath(root)
    wanted = os.path.join(real_root, *parts)
    candidates = [(wanted, None)] + [(wanted + suffix, encoding) for suffix, encoding in _COMPRESSED_SUFFIXES]
    for candidate, encoding in candidates:
        if not os.path.lexists(candidate):
            continue
        real = os.path.realpath(candidate)
        if not _inside(real_root, real):
            raise PathRefused(f"{candidate} resolves to {real}, outside the served root {real_root}")
        if os.path.isfile(real):
            return ResolvedFile(path=Path(real), encoding=encoding)
    raise PathMissing(f"no file {wanted} (nor .gz/.br) under {real_root}")
