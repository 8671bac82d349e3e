"""Neuroglancer for exaconnect layers: viewer states, shareable links and a local, read-only server.

    build_state(layers) -> dict      the viewer state (JSON) for layer paths/URLs
    link(layers, base_url=None)      a shareable link, state in the URL fragment
    short_link(layers, ...)          the state saved as JSON and a short `#!URL` link to it
    serve(layers, port, bind, token) the bundled client + local layers over HTTP, until Ctrl-C
    ViewerServer(...)                the same server as an object (start/close), for tests and notebooks

The `exaconnect view` / `exaconnect link` commands live in `exaconnect/cli/view.py`.
Imports are lazy so that `import exaconnect.viewer` does not pull in neuroglancer and cloud-volume.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "build_state": "exaconnect.viewer.state",
    "link": "exaconnect.viewer.links",
    "short_link": "exaconnect.viewer.links",
    "serve": "exaconnect.viewer.server",
    "ViewerServer": "exaconnect.viewer.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'exaconnect.viewer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
