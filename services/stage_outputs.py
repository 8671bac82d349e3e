"""Are a completed stage's outputs still there? Checked before a resumed run skips the stage.

When a stage completes, the runner records which of its `writes()` paths exist (local ones; a
path that names no file, such as `LAYER/mesh` whose folder the layer's info names, is resolved
through that info). On resume each of those must still exist; for a layer (a folder with an
`info`), its info must still parse and every chunk its checksum manifests list must still be
present, so a deleted chunk, mip folder or info makes the stage run again instead of being
skipped over a hole. Remote paths (gs://, s3://) are not checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_COMPRESSED_SUFFIXES = ("", ".gz", ".br", ".zstd", ".zst")


def resolve_output(url: str) -> str | None:
    """The local file or folder `url` stands for, None when it is remote or names nothing."""
    from exaconnect.errors import InputError
    from exaconnect.precomputed.layers import local_path

    try:
        path = local_path(url)
    except InputError:
        return None
    if path is None:
        return None
    if os.path.exists(path):
        return path
    parent, name = os.path.split(path.rstrip("/"))
    try:
        info = json.loads(Path(parent, "info").read_text())
    except (OSError, ValueError):
        return None
    target = info.get(name) if isinstance(info, dict) else None
    if isinstance(target, str) and target and os.path.exists(os.path.join(parent, target)):
        return os.path.join(parent, target)
    return None


def existing_outputs(writes: list[str]) -> dict[str, dict]:
    """{write URL: {"path", "layer"}} for the outputs that exist now (recorded when a stage completes)."""
    out = {}
    for url in writes:
        path = resolve_output(url)
        if path is not None:
            out[url] = {"path": path, "layer": os.path.isfile(os.path.join(path, "info"))}
    return out


def _layer_problem(folder: Path) -> str:
    try:
        json.loads((folder / "info").read_text())
    except OSError:
        return f"{folder}/info is missing"
    except ValueError:
        return f"{folder}/info does not parse"
    manifests = folder / "checksums"
    if not manifests.is_dir():
        return ""
    for manifest in sorted(manifests.rglob("*.json")):
        try:
            chunks = json.loads(manifest.read_text()).get("chunks", {})
        except (OSError, ValueError, AttributeError):
            continue
        for name in chunks:
            if not any(os.path.exists(folder / f"{name}{suffix}") for suffix in _COMPRESSED_SUFFIXES):
                return f"chunk {folder}/{name} (listed in {manifest.relative_to(folder)}) is missing"
    return ""


def missing_output(recorded: dict[str, dict]) -> str:
    """'' when every output recorded at completion is still present, else the first that is not."""
    for url, entry in recorded.items():
        if not isinstance(entry, dict) or not entry.get("path"):
            continue
        folder = Path(entry["path"])
        if not folder.exists():
            return f"{folder} (written as {url}) is missing"
        if entry.get("layer"):
            problem = _layer_problem(folder)
            if problem:
                return problem
    return ""
