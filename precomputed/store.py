"""The store for intermediate files of a run: segmentation staging, alignment flow fields and
meshes, and the runner's stage records all live in one.

A file counts only once its `.done` marker is present and matches it: the marker is written
last and holds the file's SHA-256 and size, and a rewrite removes the old marker first. So a task
killed mid-write never leaves anything a later stage would read, and a rerun simply writes the
same file again. On a local or shared filesystem (Lustre, DAOS's POSIX interface) each file is
also written to a temporary name and renamed into place, so a reader never sees half a file; on
an object store each file is one PUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from exaconnect.errors import LayerError
from exaconnect.precomputed.layers import layer_url, local_path

DONE = ".done"


class ArtifactStore:
    """Files under one URL (a path, `file://`, `gs://`, `s3://`), each vouched for by a marker."""

    def __init__(self, url: str) -> None:
        self.url = layer_url(url)
        self.root = local_path(self.url)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def where(self, key: str) -> str:
        return f"{self.url}/{key}"

    # ------------------------------------------------------------ raw bytes

    def _write(self, key: str, data: bytes) -> None:
        if self.root is not None:
            final = os.path.join(self.root, key)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
            return
        from cloudfiles import CloudFiles

        CloudFiles(self.url).put(key, data, compress=None, raw=True, cache_control="no-cache")

    def _read(self, key: str) -> bytes | None:
        if self.root is not None:
            try:
                with open(os.path.join(self.root, key), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None
        from cloudfiles import CloudFiles

        return CloudFiles(self.url).get(key, raw=True)

    def _delete(self, key: str) -> None:
        if self.root is not None:
            try:
                os.unlink(os.path.join(self.root, key))
            except FileNotFoundError:
                pass
            return
        from cloudfiles import CloudFiles

        CloudFiles(self.url).delete(key)

    # ------------------------------------------------------------ completed files

    def put(self, key: str, data: bytes, info: dict[str, Any] | None = None) -> None:
        """Write `key`, then its marker (with `info` beside the checksum)."""
        self._delete(key + DONE)
        self._write(key, data)
        record = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **(info or {})}
        self._write(key + DONE, json.dumps(record).encode())

    def marker(self, key: str) -> dict | None:
        """The marker of `key`, or None when the file is not complete."""
        raw = self._read(key + DONE)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None  # a torn marker vouches for nothing

    def get(self, key: str) -> bytes | None:
        """The bytes of a completed file, None when it is absent or unfinished; LayerError when
        it is present but does not match its marker (damaged after it was written)."""
        done = self.marker(key)
        if done is None:
            return None
        data = self._read(key)
        if data is None or hashlib.sha256(data).hexdigest() != done.get("sha256"):
            raise LayerError(f"{self.where(key)} does not match its {DONE} marker; rerun the task that writes it")
        return data

    def require(self, key: str, hint: str = "its task has not finished yet") -> bytes:
        data = self.get(key)
        if data is None:
            raise LayerError(f"{self.where(key)} is not complete (no {DONE} marker); {hint}")
        return data

    def is_complete(self, key: str) -> bool:
        try:
            return self.get(key) is not None
        except LayerError:
            return False

    def put_json(self, key: str, value: Any, info: dict[str, Any] | None = None) -> None:
        self.put(key, json.dumps(value, indent=1, default=str).encode(), info)

    def get_json(self, key: str) -> Any:
        data = self.get(key)
        return None if data is None else json.loads(data)

    def delete(self, key: str) -> None:
        """Forget a file: its marker first, so it is never half-vouched for."""
        self._delete(key + DONE)
        self._delete(key)

    def delete_prefix(self, prefix: str) -> None:
        if self.root is not None:
            import shutil

            target = os.path.join(self.root, prefix)
            if os.path.isdir(target):
                shutil.rmtree(target)
            return
        from cloudfiles import CloudFiles

        files = CloudFiles(self.url)
        files.delete(list(files.list(prefix=prefix)))

    def local_file(self, key: str) -> str | None:
        """The path of a completed file on a local/shared filesystem (for memory-mapping)."""
        return None if self.root is None else os.path.join(self.root, key)
