"""One local HTTP server for the neuroglancer client, local precomputed layers and live task boxes.

Routes (GET/HEAD only; everything else is 405):
  /                       redirect to the client (which then gets the state of the served layers)
  /v/exaconnect/<file>    the neuroglancer client bundled in the `neuroglancer` package (no internet)
  /events/exaconnect      a silent event stream: the bundled client expects its Python server there
  /data/<root>/<path>     files of the layer directories given, read-only (see `safepath`)
  /tasks/...              the task-state file as a precomputed annotation source (see `tasks`)

Every answer carries `Access-Control-Allow-Origin: *` (so another neuroglancer client can read
the data too) and `Cache-Control: no-store`: chunks written after startup must be seen, and a
chunk that was missing (404, which neuroglancer draws as empty) may appear later.
"""

from __future__ import annotations

import hmac
import json
import http.cookies
import importlib.resources
import os
import re
import secrets
import socket
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import neuroglancer

from exaconnect.errors import ExaconnectError, InputError
from exaconnect.viewer import http_files, tasks
from exaconnect.viewer.layers import LayerInfo, inspect_layer
from exaconnect.viewer.state import to_dict, viewer_state
from exaconnect.viewer.roots import (
    CLIENT_SESSION,
    DATA_PREFIX,
    DEFAULT_BIND,
    TASKS_PREFIX,
    client_url,
    local_roots,
    server_url,
    source_resolver,
    tasks_source,
)
from exaconnect.viewer.safepath import PathMissing, PathRefused, resolve_file, split_request_path

TOKEN_COOKIE = "exaconnect_token"
TOKEN_HEADER = "X-Exaconnect-Token"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# How often the silent event stream writes a comment, so a dead browser tab frees its thread.
_KEEPALIVE_S = 15.0
# A Host header that may be written into a URL: a name or address and a port, nothing else.
_HOST = re.compile(r"^[A-Za-z0-9.\-]+:\d+$|^\[[0-9A-Fa-f:.]+\]:\d+$")


def client_dir() -> Path:
    """The built neuroglancer client shipped inside the `neuroglancer` Python package."""
    path = Path(str(importlib.resources.files("neuroglancer.static").joinpath("client")))
    if not (path / "index.html").is_file():
        raise ExaconnectError(f"neuroglancer client not found at {path}; expected index.html from the neuroglancer package")
    return path


@dataclass(frozen=True)
class ServerConfig:
    roots: dict[str, Path]  # root name -> layer directory
    client: Path
    token: str | None
    tasks_file: Path | None
    tasks_resolution: tuple[float, float, float]
    quiet: bool = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], config: ServerConfig, stopping: threading.Event):
        self.bind_address = address[0]
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.config = config
        self.stopping = stopping
        # The viewer state as JSON text; it names the server's own origin, so it is set once
        # the socket is bound (and the port known).
        self.state_json = ""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "exaconnect-viewer"

    # -- plumbing ---------------------------------------------------------------------------
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Chunk traffic is too much to print; refusals are what a person serving data wants to see.
        if not self.server.config.quiet or str(code) in ("403", "405", "500"):
            super().log_request(code, size)

    def _common_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Expose-Headers", "Content-Length, Content-Range, Content-Encoding")
        self.send_header("Cache-Control", "no-store")

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", headers: dict | None = None) -> None:
        self.send_response(status)
        self._common_headers()
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, headers: dict | None = None) -> None:
        self._send(status, f"{status.value} {status.phrase}\n".encode(), headers=headers)

    # -- access -----------------------------------------------------------------------------
    def _token_given(self, query: dict[str, list[str]]) -> tuple[str | None, bool]:
        """The presented token and whether it came in the query (then it is set as a cookie)."""
        if "token" in query:
            return query["token"][0], True
        header = self.headers.get(TOKEN_HEADER)
        if header:
            return header, False
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        cookies = http.cookies.SimpleCookie()
        try:
            cookies.load(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            return None, False
        morsel = cookies.get(TOKEN_COOKIE)
        return (morsel.value if morsel else None), False

    def _authorised(self, query: dict[str, list[str]]) -> tuple[bool, dict]:
        expected = self.server.config.token
        if expected is None:
            return True, {}
        given, from_query = self._token_given(query)
        if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
            return False, {}
        # The client's own fetches (scripts, workers, chunks) carry no query; a same-site
        # cookie lets them through after the user opened the link once.
        cookie = f"{TOKEN_COOKIE}={expected}; Path=/; HttpOnly; SameSite=Strict" if from_query else None
        return True, ({"Set-Cookie": cookie} if cookie else {})

    # -- methods ----------------------------------------------------------------------------
    def do_OPTIONS(self) -> None:  # CORS preflight, e.g. a Range request from another client
        self.send_response(HTTPStatus.NO_CONTENT)
        self._common_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", f"Range, Authorization, {TOKEN_HEADER}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _not_allowed(self) -> None:
        self.close_connection = True  # the request body is not read
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, HEAD, OPTIONS"})

    def do_POST(self) -> None:
        if self.path.partition("?")[0] == f"/state/{CLIENT_SESSION}":
            # The bundled client reports each view change here; 412 ("the server's state is
            # newer") is the answer it drops silently, and nothing is stored.
            self.close_connection = True
            self._error(HTTPStatus.PRECONDITION_FAILED)
            return
        self._not_allowed()

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self) -> None:
        raw_path, _, raw_query = self.path.partition("?")
        query = urllib.parse.parse_qs(raw_query, keep_blank_values=True)
        ok, cookie = self._authorised(query)
        if not ok:
            self._error(HTTPStatus.FORBIDDEN)
            return
        try:
            parts = split_request_path(raw_path)
            if not parts:
                location = f"/v/{CLIENT_SESSION}/"  # the state follows on the event stream
                self._send(HTTPStatus.FOUND, b"", headers={"Location": location, **cookie})
            elif parts[:2] == ["v", CLIENT_SESSION]:
                name = parts[2:] or ["index.html"]
                self._file(self.server.config.client, name, cookie)
            elif parts == ["events", CLIENT_SESSION]:
                self._event_stream(wants_state="gs" in query)
            elif parts[0] == DATA_PREFIX.strip("/") and len(parts) >= 2 and parts[1] in self.server.config.roots:
                self._file(self.server.config.roots[parts[1]], parts[2:], cookie)
            elif parts[0] == TASKS_PREFIX.strip("/") and self.server.config.tasks_file is not None:
                self._tasks(parts[1:])
            else:
                self._error(HTTPStatus.NOT_FOUND)
        except PathRefused:
            self._error(HTTPStatus.FORBIDDEN)
        except PathMissing:
            self._error(HTTPStatus.NOT_FOUND)
        except http_files.RangeNotSatisfiable:
            self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
        except InputError as exc:  # a malformed task file: say so rather than hide the layer
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"{exc}\n".encode())

    # -- content ----------------------------------------------------------------------------
    def _file(self, root: Path, parts: list[str], extra: dict) -> None:
        found = resolve_file(root, parts)
        data = found.path.read_bytes()
        headers = dict(extra)
        ctype = http_files.content_type(parts[-1] if parts else "")
        if found.encoding is not None:
            if http_files.accepts(self.headers.get("Accept-Encoding"), found.encoding):
                headers["Content-Encoding"] = found.encoding
            else:
                data = http_files.decode(data, found.encoding)
            self._send(HTTPStatus.OK, data, ctype, headers)
            return
        span = http_files.byte_range(self.headers.get("Range"), len(data))
        headers["Accept-Ranges"] = "bytes"
        if span is None:
            self._send(HTTPStatus.OK, data, ctype, headers)
            return
        start, stop = span
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        self._send(HTTPStatus.PARTIAL_CONTENT, data[start:stop], ctype, headers)

    def _tasks(self, parts: list[str]) -> None:
        config = self.server.config
        states = tasks.read_task_states(config.tasks_file)  # type: ignore[arg-type]
        if parts == ["info"]:
            info = tasks.annotation_info(states, config.tasks_resolution)
            self._send(HTTPStatus.OK, json.dumps(info).encode(), "application/json")
        elif parts == ["spatial0", "0_0_0"]:
            self._send(HTTPStatus.OK, tasks.encode_spatial_chunk(states), "application/octet-stream")
        elif len(parts) == 2 and parts[0] == "by_id" and parts[1].isdigit():
            record = tasks.encode_by_id(states, int(parts[1]))
            if record is None:
                self._error(HTTPStatus.NOT_FOUND)
            else:
                self._send(HTTPStatus.OK, record, "application/octet-stream")
        else:
            self._error(HTTPStatus.NOT_FOUND)

    def _state_message(self) -> bytes:
        """The state event, its data URLs rewritten to the host the browser reached us by.

        Behind `--bind 0.0.0.0` a browser on another machine must fetch chunks from this
        machine's name, not from its own 127.0.0.1.
        """
        text = self.server.state_json
        host = self.headers.get("Host", "")
        if _HOST.match(host):
            own = f"precomputed://{server_url(self.server.bind_address, self.server.server_address[1])}/"
            text = text.replace(json.dumps(own)[1:-1], json.dumps(f"precomputed://http://{host}/")[1:-1])
        return f"data: {{\"k\": \"s\", \"g\": \"1\", \"s\": {text}}}\n\n".encode()

    def _event_stream(self, wants_state: bool) -> None:
        # The bundled client syncs its state with a Python server through this stream (and shows
        # "Disconnected from Python server" while it is down). Opened without a URL fragment, it
        # asks for the state (`gs=` in the query) and takes it from the first message; with a
        # fragment it does not, and gets only keep-alive comments.
        # Loading the state this way, after the page has started, also avoids a neuroglancer
        # start-up race: restoring a fragment with an annotation layer while the page is still
        # loading on a busy machine sometimes drops the first layer ("Cannot read properties of
        # undefined (reading 'length')").
        self.send_response(HTTPStatus.OK)
        self._common_headers()
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        self.wfile.write(self._state_message() if wants_state else b": exaconnect\n\n")
        self.wfile.flush()
        while not self.server.stopping.wait(_KEEPALIVE_S):
            self.wfile.write(b": keepalive\n\n")
            self.wfile.flush()


class ViewerServer:
    """A running server; `url` opens the viewer on the served layers (with the token, if any)."""

    def __init__(
        self,
        layers: Sequence[str | LayerInfo],
        port: int = 0,
        bind: str = DEFAULT_BIND,
        token: str | None = None,
        tasks_file: str | os.PathLike | None = None,
        statistics: bool = True,
        quiet: bool = True,
    ):
        infos = [layer if isinstance(layer, LayerInfo) else inspect_layer(layer) for layer in layers]
        if not infos:
            raise InputError("no layers given; expected at least one layer path or URL")
        if token is not None and (not token or not token.isprintable() or any(c in token for c in " ;,\"\\")):
            raise InputError("--token must be non-empty printable text without spaces, ';', ',', quotes or backslashes")
        if token is None and bind not in _LOOPBACK:
            # Serving beyond this machine without a token would hand the data to anyone on the
            # network; make one up rather than refuse.
            token = secrets.token_urlsafe(24)
        server_url(bind, port)  # validates the port
        config = ServerConfig(
            roots=local_roots(infos),
            client=client_dir(),
            token=token,
            tasks_file=Path(tasks_file).resolve() if tasks_file is not None else None,
            tasks_resolution=infos[0].resolution,
            quiet=quiet,
        )
        self.stopping = threading.Event()
        try:
            self._httpd = _Server((bind, port), config, self.stopping)
        except OSError as exc:
            raise InputError(f"cannot listen on {bind}:{port} ({exc}); expected a free port (--port) and a local address (--bind)") from exc
        self.config = config
        self.bind = bind
        self.port = int(self._httpd.server_address[1])
        self.origin = server_url(bind, self.port)
        state = viewer_state(
            infos,
            source_resolver(infos, self.origin),
            tasks_source(self.origin) if tasks_file is not None else None,
            statistics,
        )
        self.state = to_dict(state)
        self.link = neuroglancer.to_url(state, prefix=client_url(self.origin))
        self._httpd.state_json = json.dumps(self.state)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The URL to open: the client (and the token when one is required); the state comes from the server."""
        base = client_url(self.origin)
        if self.config.token is None:
            return base
        return f"{base}?token={urllib.parse.quote(self.config.token)}"

    def start(self) -> "ViewerServer":
        """Serve in a background thread (for tests and notebooks)."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="exaconnect-viewer", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def close(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> "ViewerServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    layers: Sequence[str],
    port: int = 0,
    bind: str = DEFAULT_BIND,
    token: str | None = None,
    tasks_file: str | os.PathLike | None = None,
) -> None:
    """Serve the layers and the viewer until interrupted; prints the URL to open."""
    server = ViewerServer(layers, port=port, bind=bind, token=token, tasks_file=tasks_file)
    print(f"exaconnect viewer on {server.origin} serving {', '.join(server.config.roots) or 'no local layers'}")
    print(server.url, flush=True)
    print(f"shareable link (state in the URL): {server.link}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.close()
