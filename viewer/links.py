"""Shareable neuroglancer links.

Two forms:
- long: the state JSON in the URL fragment (`CLIENT#!<urlencoded JSON>`), kilobytes long;
- short: the state JSON saved as a file and the fragment naming its URL
  (`CLIENT#!http://127.0.0.1:8765/states/NAME.json`, `CLIENT#!gs://bucket/states/NAME.json`).

The short form is neuroglancer's own: when the fragment is `#!` followed by `scheme://`, the
client reads that URL through its key-value store layer (http(s), gs, s3, ...) and restores the
state from the JSON (`UrlHashBinding.updateFromUrlHash` in neuroglancer's
src/ui/url_hash_binding.ts). It needs no particular content type; a state on another origin than
the client's needs CORS, which is why local states are served by `exaconnect view`, the same
origin as its bundled client.

Where a state is saved: `state_dir` if given; else `states/` beside the first local layer
(which `exaconnect view` serves at `/states/`); else `states/` beside the first remote layer
(gs://, s3://), written with cloudfiles. The name is a hash of the state unless given, so linking
the same layers twice gives the same link.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import neuroglancer

from exaconnect.errors import InputError, LayerError
from exaconnect.precomputed.layers import layer_url, local_path
from exaconnect.viewer.layers import LayerInfo, inspect_layer
from exaconnect.viewer.roots import (
    DEFAULT_BIND,
    DEFAULT_PORT,
    PUBLIC_CLIENT_URL,
    STATES_FOLDER,
    STATES_PREFIX,
    client_url,
    server_url,
    source_resolver,
    tasks_source,
)
from exaconnect.viewer.state import to_dict, viewer_state

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Object stores neuroglancer reads a state from directly (the fragment `#!gs://...`).
_STATE_STORES = ("gs://", "s3://")


def check_base_url(base_url: str) -> str:
    """A neuroglancer client URL without a fragment; InputError names a bad --base-url."""
    if not base_url.startswith(("http://", "https://")) or "#" in base_url:
        raise InputError(f"--base-url {base_url!r}; expected an http(s) URL of a neuroglancer client, without '#'")
    return base_url


def _inspect(layers: Sequence[str | LayerInfo]) -> list[LayerInfo]:
    return [layer if isinstance(layer, LayerInfo) else inspect_layer(layer) for layer in layers]


def _client(layers: Sequence[LayerInfo], base_url: str | None, origin: str, needs_server: bool) -> str:
    if base_url is None:
        # The public client cannot read a local disk; a link with local layers (or a local
        # state) needs our server, which also serves the client, so send the user there.
        needs_server = needs_server or any(layer.is_local for layer in layers)
        base_url = client_url(origin) if needs_server else PUBLIC_CLIENT_URL
    return check_base_url(base_url)


def state_link(
    layers: Sequence[LayerInfo],
    base_url: str | None = None,
    origin: str | None = None,
    tasks: bool = False,
    statistics: bool = True,
) -> str:
    """The long link for already inspected layers; local ones are read through the server at `origin`."""
    origin = (origin or server_url(DEFAULT_BIND, DEFAULT_PORT)).rstrip("/")
    base_url = _client(layers, base_url, origin, needs_server=False)
    state = viewer_state(layers, source_resolver(layers, origin), tasks_source(origin) if tasks else None, statistics)
    return neuroglancer.to_url(state, prefix=base_url)


def link(layers: Sequence[str], base_url: str | None = None, server: str | None = None) -> str:
    """A shareable long link to `layers` (paths or gs://, s3://, https://, file:// URLs).

    Remote layers are linked directly (`precomputed://gs://...`); local layers through the
    local server (`server`, default `http://127.0.0.1:8765`, the port `exaconnect view` uses).
    The default client is the public neuroglancer for remote-only links, else our server's.
    """
    return state_link([inspect_layer(layer) for layer in layers], base_url=base_url, origin=server)


@dataclass(frozen=True)
class ShortLink:
    """A saved state and the links to it; `str(link)` is the short link."""

    url: str  # CLIENT#!STATE_URL: what to share
    state_url: str  # where the client reads the state: http://ORIGIN/states/NAME.json, gs://..., s3://...
    state_location: str  # where it was written: a local file path, or the gs:// / s3:// URL
    long_url: str  # the same view with the state in the fragment

    def __str__(self) -> str:
        return self.url


def _parent(url: str) -> str:
    scheme, _, rest = url.partition("://")
    parts = rest.rstrip("/").split("/")
    return f"{scheme}://{'/'.join(parts[:-1])}" if len(parts) > 1 else url.rstrip("/")


def default_state_dir(layers: Sequence[LayerInfo]) -> str:
    """`states/` beside the first local layer, else beside the first layer (a gs:// or s3:// URL)."""
    for layer in layers:
        if layer.local_path is not None:
            return str(layer.local_path.parent / STATES_FOLDER)
    return f"{_parent(layers[0].url)}/{STATES_FOLDER}"


def state_name(state_json: str) -> str:
    """A name from the state's content: the same view always gets the same file."""
    return "ng-" + hashlib.sha256(state_json.encode()).hexdigest()[:16]


def _write_local(folder: Path, name: str, text: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{name}.json"
        # Replace atomically so the server never serves half a state.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"--state-dir {folder}: cannot write the viewer state there ({exc}); expected a writable folder") from exc
    return target


def _write_remote(folder: str, name: str, text: str) -> str:
    from cloudfiles import CloudFiles

    try:
        CloudFiles(folder).put(f"{name}.json", text.encode(), content_type="application/json", compress=None,
                               cache_control="no-cache")
    except Exception as exc:  # cloudfiles raises transport- and credential-specific errors
        raise LayerError(
            f"cannot write the viewer state to {folder}/{name}.json ({type(exc).__name__}: {exc}); "
            "expected a writable bucket path: give --state-dir (a local folder served by `exaconnect view`, "
            "or a writable gs:// / s3:// folder) or use --long"
        ) from exc
    return f"{folder}/{name}.json"


def short_link(
    layers: Sequence[str | LayerInfo],
    state_dir: str | os.PathLike | None = None,
    name: str | None = None,
    base_url: str | None = None,
    server: str | None = None,
    tasks: bool = False,
    statistics: bool = True,
) -> ShortLink:
    """Save the viewer state of `layers` as JSON and return a short `#!URL` link to it.

    `state_dir`: a local folder or a gs:// / s3:// folder (default: see the module docstring).
    A local state is read through `exaconnect view` at `server` (default http://127.0.0.1:8765),
    which serves `states/` beside its local layers (and `view --state-dir DIR`).
    `name`: the file name without `.json` (default: a hash of the state).
    `base_url`: the neuroglancer client (default: our server's when anything is local, else the public one).
    Raises InputError for a bad name/folder, LayerError when a remote folder cannot be written.
    """
    infos = _inspect(layers)
    if not infos:
        raise InputError("no layers given; expected at least one layer path or URL")
    if name is not None:
        name = name[: -len(".json")] if name.endswith(".json") else name
        if not _NAME.match(name):
            raise InputError(f"--name {name!r}; expected letters, digits, '.', '_' or '-', starting with a letter or digit")
    origin = (server or server_url(DEFAULT_BIND, DEFAULT_PORT)).rstrip("/")
    state = viewer_state(infos, source_resolver(infos, origin), tasks_source(origin) if tasks else None, statistics)
    state_dict = to_dict(state)
    text = json.dumps(state_dict, sort_keys=True, separators=(",", ":"))
    name = name or state_name(text)
    folder = layer_url(str(state_dir)) if state_dir is not None else layer_url(default_state_dir(infos))
    folder = folder.rstrip("/")
    folder_path = local_path(folder)
    if folder_path is not None:
        location = str(_write_local(Path(folder_path), name, text))
        state_url = f"{origin}{STATES_PREFIX}{name}.json"
    elif folder.startswith(_STATE_STORES):
        location = state_url = _write_remote(folder, name, text)
    elif state_dir is not None:
        raise InputError(f"--state-dir {folder}: cannot write a viewer state there; expected a local folder, gs:// or s3://")
    else:
        raise LayerError(
            f"cannot save the viewer state beside {infos[0].url} ({folder} is read-only over http); "
            "give --state-dir (a local folder served by `exaconnect view`, or a writable gs:// / s3:// folder) or use --long"
        )
    client = _client(infos, base_url, origin, needs_server=folder_path is not None)
    return ShortLink(
        url=f"{client}#!{state_url}",
        state_url=state_url,
        state_location=location,
        long_url=neuroglancer.to_url(state, prefix=client),
    )
