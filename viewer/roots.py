"""How local layers are named on the local server: `/data/<root-name>/...`.

Both the server (which maps a name back to a directory) and the link builder (which writes
the name into a URL) use `root_names`, so a link made with `exaconnect link` matches what
`exaconnect view` serves for the same layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from exaconnect.errors import InputError
from exaconnect.viewer.layers import LayerInfo

# `exaconnect link` writes local layers against this port; `exaconnect view` uses it unless
# told otherwise, so the two commands meet without the user passing a port to both.
DEFAULT_PORT = 8765
DEFAULT_BIND = "127.0.0.1"
PUBLIC_CLIENT_URL = "https://neuroglancer-demo.appspot.com/"
# The bundled client must be served under `/v/<session>/`: it derives its server endpoints
# (`/events/<session>` and friends) from that path.
CLIENT_SESSION = "exaconnect"
DATA_PREFIX = "/data/"
TASKS_PREFIX = "/tasks/"
# Saved viewer states (`exaconnect link` short links): `/states/<name>.json`.
STATES_PREFIX = "/states/"
# The folder, beside a layer, where `exaconnect link` writes states and `exaconnect view` finds them.
STATES_FOLDER = "states"


def root_names(paths: Sequence[Path]) -> dict[str, Path]:
    """Unique URL-safe names for local layer directories: the directory name, `-2`, `-3` on clashes."""
    names: dict[str, Path] = {}
    for path in paths:
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.name).strip(".") or "layer"
        name, n = base, 1
        while name in names and names[name] != path:
            n += 1
            name = f"{base}-{n}"
        names[name] = path
    return names


def server_url(bind: str, port: int) -> str:
    """The http origin for a bind address; a wildcard bind is reached through loopback locally."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port}; expected 0..65535")
    host = "127.0.0.1" if bind in ("", "0.0.0.0") else ("[::1]" if bind == "::" else bind)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def client_url(origin: str) -> str:
    return f"{origin.rstrip('/')}/v/{CLIENT_SESSION}/"


def tasks_source(origin: str) -> str:
    """The precomputed annotation source under which the server publishes the task boxes."""
    return f"precomputed://{origin.rstrip('/')}{TASKS_PREFIX.rstrip('/')}"


def local_roots(layers: Sequence[LayerInfo]) -> dict[str, Path]:
    """Root name -> directory for the local layers among `layers` (remote ones need no server)."""
    return root_names([layer.local_path for layer in layers if layer.local_path is not None])


def source_resolver(layers: Sequence[LayerInfo], origin: str) -> Callable[[LayerInfo], str]:
    """Where the browser reads each layer: local ones through the server at `origin`, remote ones directly."""
    by_path = {path: name for name, path in local_roots(layers).items()}

    def source(layer: LayerInfo) -> str:
        if layer.local_path is None:
            return f"precomputed://{layer.url}"
        return f"precomputed://{origin.rstrip('/')}{DATA_PREFIX}{by_path[layer.local_path]}"

    return source


def default_state_dirs(layers: Sequence[LayerInfo]) -> list[Path]:
    """`<parent of each local layer>/states`, first layer first: the folders `view` serves states from."""
    dirs: list[Path] = []
    for layer in layers:
        if layer.local_path is not None and layer.local_path.parent / STATES_FOLDER not in dirs:
            dirs.append(layer.local_path.parent / STATES_FOLDER)
    return dirs
