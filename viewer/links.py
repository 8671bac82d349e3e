"""Shareable neuroglancer links: the state JSON in the URL fragment (`BASE#!<urlencoded JSON>`)."""

from __future__ import annotations

from collections.abc import Sequence

import neuroglancer

from exaconnect.errors import InputError
from exaconnect.viewer.layers import LayerInfo, inspect_layer
from exaconnect.viewer.roots import (
    DEFAULT_BIND,
    DEFAULT_PORT,
    PUBLIC_CLIENT_URL,
    client_url,
    server_url,
    source_resolver,
    tasks_source,
)
from exaconnect.viewer.state import viewer_state


def check_base_url(base_url: str) -> str:
    """A neuroglancer client URL without a fragment; InputError names a bad --base-url."""
    if not base_url.startswith(("http://", "https://")) or "#" in base_url:
        raise InputError(f"--base-url {base_url!r}; expected an http(s) URL of a neuroglancer client, without '#'")
    return base_url


def state_link(
    layers: Sequence[LayerInfo],
    base_url: str | None = None,
    origin: str | None = None,
    tasks: bool = False,
    statistics: bool = True,
) -> str:
    """The link for already inspected layers; local ones are read through the server at `origin`."""
    origin = (origin or server_url(DEFAULT_BIND, DEFAULT_PORT)).rstrip("/")
    if base_url is None:
        # The public client cannot read a local disk; a link with local layers needs our server,
        # which also serves the client, so send the user there.
        base_url = client_url(origin) if any(layer.is_local for layer in layers) else PUBLIC_CLIENT_URL
    base_url = check_base_url(base_url)
    state = viewer_state(layers, source_resolver(layers, origin), tasks_source(origin) if tasks else None, statistics)
    return neuroglancer.to_url(state, prefix=base_url)


def link(layers: Sequence[str], base_url: str | None = None, server: str | None = None) -> str:
    """A shareable link to `layers` (paths or gs://, s3://, https://, file:// URLs).

    Remote layers are linked directly (`precomputed://gs://...`); local layers through the
    local server (`server`, default `http://127.0.0.1:8765`, the port `exaconnect view` uses).
    The default client is the public neuroglancer for remote-only links, else our server's.
    """
    return state_link([inspect_layer(layer) for layer in layers], base_url=base_url, origin=server)
