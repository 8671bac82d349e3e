"""One local HTTP server for the neuroglancer client, local precomputed layers and live task boxes.

Routes (GET/HEAD; OPTIONS for CORS preflights; every other method is 405):
  /                       redirect to the client (which then gets the state of the served layers)
  /v/exaconnect/<file>    the neuroglancer client bundled in the `neuroglancer` package (no internet)
  /events/exaconnect      a silent event stream: the bundled client expects its Python server there
  /data/<root>/<path>     files of the layer directories given, read-only (see `safepath`)
  /states/<name>.json     saved viewer states (`exaconnect link` short links), from the state folders
  /tasks/...              the task-state file as a precomputed annotation source (see `tasks`)

Who may read (a web page in the user's own browser is the threat on loopback):
- On a loopback bind the Host header must be a loopback name (127.0.0.1, localhost or [::1], at
  any port so that SSH tunnels work), so a DNS-rebinding page (evil.example re-resolved to
  127.0.0.1) gets 403.
- CORS is answered only for this server's own origins (its loopback names at its port, or the
  origin the browser reaches it by), origins given in `allow_origins` (`view --allow-origin`, for
  another neuroglancer client), and requests that present the token explicitly (query, header,
  bearer; never the ambient cookie); a request from any other Origin gets 403. Same-origin
  requests (the bundled client) carry no Origin and need no CORS.
- Beyond loopback a token is required on every request (see `ViewerServer`).

Resources: a request's line and headers are read in a selector (no thread) and must be whole
within `request_timeout_s` (a silent, idle keep-alive or dripping client is cut off there); only
then does the request run on a bounded pool of `max_threads`, where the same timeout bounds each
socket write; event streams are capped so that open browser tabs cannot take the whole pool.
Files are streamed, and a Range request reads only its range.

Every answer carries `Cache-Control: no-store`: chunks written after startup must be seen, and a
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
import selectors
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import neuroglancer

from exaconnect.errors import ExaconnectError, InputError
from exaconnect.precomputed.layers import local_path
from exaconnect.viewer import http_files, tasks
from exaconnect.viewer.layers import LayerInfo, inspect_layer
from exaconnect.viewer.state import to_dict, viewer_state
from exaconnect.viewer.roots import (
    CLIENT_SESSION,
    DATA_PREFIX,
    DEFAULT_BIND,
    STATES_PREFIX,
    TASKS_PREFIX,
    client_url,
    default_state_dirs,
    local_roots,
    server_url,
    source_resolver,
    tasks_source,
)
from exaconnect.viewer.safepath import PathMissing, PathRefused, resolve_file, split_request_path

TOKEN_COOKIE = "exaconnect_token"
TOKEN_HEADER = "X-Exaconnect-Token"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# How often the silent event stream writes a comment, so a dead browser tab frees its thread.
_KEEPALIVE_S = 15.0
# A Host header that may be written into a URL: a name or address and a port, nothing else.
_HOST = re.compile(r"^[A-Za-z0-9.\-]+:\d+$|^\[[0-9A-Fa-f:.]+\]:\d+$")
# A saved state's file name: what `links.short_link` writes.
_STATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\.json$")
# Defaults sized for one person's browser: Chrome opens at most 6 connections per host, and an
# idle keep-alive connection holds a worker for at most the timeout.
DEFAULT_MAX_THREADS = 32
DEFAULT_REQUEST_TIMEOUT_S = 20.0
# Connections accepted but not yet sending (no thread each); beyond this new ones are closed.
_MAX_WAITING = 4096
# Connections whose request head came and wait for a worker; beyond this they are closed unanswered.
_MAX_QUEUED = 256
# Longest request line plus headers; a longer head is refused (431) before it reaches a worker.
_MAX_HEAD_BYTES = 64 * 1024
_COPY_BLOCK = 1 << 20


_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-]+(:\d+)?$|^https?://\[[0-9A-Fa-f:.]+\](:\d+)?$")


def check_origin(origin: str) -> str:
    """A web origin (`https://host[:port]`, no path) or `*`; InputError names --allow-origin."""
    origin = origin.strip().rstrip("/")
    if origin != "*" and not _ORIGIN.match(origin):
        raise InputError(f"--allow-origin {origin!r}; expected an origin such as https://neuroglancer-demo.appspot.com (scheme, host, optional port; no path)")
    return origin


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
    state_dirs: tuple[Path, ...] = ()  # searched in order for /states/<name>.json
    allow_origins: tuple[str, ...] = ()  # other clients allowed to read (CORS), e.g. the public one
    max_threads: int = DEFAULT_MAX_THREADS
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S


def is_loopback(bind: str) -> bool:
    return bind in _LOOPBACK


class _RequestReader:
    """A handler's `rfile`: the request head the selector already read, then the socket.

    http.server reads through a buffered file of the socket, whose buffer is private; this one
    keeps it in the open, so that after an answer on a keep-alive connection the bytes already
    read of a pipelined next request go back to the selector with the connection.
    """

    def __init__(self, conn: socket.socket, head: bytes) -> None:
        self._conn = conn
        self.pending = bytearray(head)

    def _fill(self) -> bool:
        data = self._conn.recv(65536)
        self.pending += data
        return bool(data)

    def readline(self, limit: int = -1) -> bytes:
        searched = 0
        while True:
            end = self.pending.find(b"\n", searched)
            if end >= 0 and (limit < 0 or end < limit):
                size = end + 1
                break
            if 0 <= limit <= len(self.pending):
                size = limit
                break
            searched = len(self.pending)
            if not self._fill():
                size = len(self.pending)
                break
        line = bytes(self.pending[:size])
        del self.pending[:size]
        return line

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self.pending) < size) and self._fill():
            pass
        size = len(self.pending) if size < 0 else min(size, len(self.pending))
        data = bytes(self.pending[:size])
        del self.pending[:size]
        return data

    def close(self) -> None:
        pass


def _head_complete(data: bytearray, start: int) -> bool:
    """Whether the bytes hold a whole request line and headers (ended by an empty line)."""
    start = max(0, start - 3)
    return data.find(b"\r\n\r\n", start) >= 0 or data.find(b"\n\n", start) >= 0


class _Waiting:
    """A connection in the selector: its address, when its request head must be complete, what came so far."""

    __slots__ = ("address", "deadline", "head")

    def __init__(self, address: object, deadline: float, head: bytes = b"") -> None:
        self.address = address
        self.deadline = deadline
        self.head = bytearray(head)


class _Server(HTTPServer):
    """An HTTP server that reads each request's line and headers in a selector, then answers on a bounded pool.

    socketserver's ThreadingMixIn starts one thread per accepted connection before a byte is
    read, so 800 half-open connections held 800 threads; handing a connection to the pool at its
    first byte is not enough either (40 clients that send one byte and stop held a 32-thread pool
    for the whole timeout). Here a connection costs a file descriptor and its buffered bytes until
    its request head is complete; the pool only ever runs requests it can answer at once. A
    keep-alive connection goes back to the selector between requests, so an idle browser
    connection holds no thread either.
    """

    request_queue_size = 128

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
        port = self.server_address[1]
        # On loopback a browser that meant to reach us names us by one of these (DNS rebinding:
        # a page on evil.example, re-resolved to 127.0.0.1, sends Host: evil.example:PORT).
        self.loopback = is_loopback(address[0])
        self.own_origins = frozenset(
            {f"http://{name}:{port}" for name in _LOOPBACK_NAMES} if self.loopback else ()
        )
        self.pool = ThreadPoolExecutor(max_workers=config.max_threads, thread_name_prefix="exaconnect-viewer")
        # Event streams last as long as a browser tab; a quarter of the pool at most.
        self.event_streams = threading.BoundedSemaphore(max(1, config.max_threads // 4))
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        # Written by shutdown() and by workers returning a keep-alive connection, so that the
        # selector wakes at once.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # Connections handed to the pool (queued or running), so close() can end them at once.
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()
        # Keep-alive connections answered by a worker, for the selector to wait on again.
        self._returned: list[tuple[socket.socket, object, bytes]] = []

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stop.clear()
        self._stopped.clear()
        timeout = self.config.request_timeout_s
        waiting: dict[socket.socket, _Waiting] = {}

        def drop(conn: socket.socket) -> None:
            selector.unregister(conn)
            del waiting[conn]
            self.shutdown_request(conn)

        def admit(conn: socket.socket, entry: _Waiting) -> None:
            """A whole request head came: to the pool (or closed unanswered when it is full)."""
            with self._active_lock:
                full = len(self._active) >= self.config.max_threads + _MAX_QUEUED
                if not full:
                    self._active.add(conn)
            if full:
                self.shutdown_request(conn)
            else:
                self.pool.submit(self._handle, conn, entry.address, bytes(entry.head))

        def wait_on(conn: socket.socket, entry: _Waiting) -> None:
            if _head_complete(entry.head, 0):
                admit(conn, entry)
            elif len(waiting) >= _MAX_WAITING:
                self.shutdown_request(conn)
            else:
                conn.setblocking(False)
                waiting[conn] = entry
                selector.register(conn, selectors.EVENT_READ)

        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    for key, _ in selector.select(min(poll_interval, timeout)):
                        if key.fileobj is self._wake_r:
                            try:
                                self._wake_r.recv(64)
                            except OSError:
                                pass
                        elif key.fileobj is self.socket:
                            try:
                                conn, address = self.socket.accept()
                            except OSError:
                                continue
                            wait_on(conn, _Waiting(address, time.monotonic() + timeout))
                        else:
                            conn = key.fileobj  # type: ignore[assignment]
                            entry = waiting[conn]
                            try:
                                data = conn.recv(65536)
                            except (BlockingIOError, InterruptedError):
                                continue
                            except OSError:
                                data = b""
                            if not data:
                                drop(conn)
                                continue
                            seen = len(entry.head)
                            entry.head += data
                            if _head_complete(entry.head, seen):
                                selector.unregister(conn)
                                del waiting[conn]
                                admit(conn, entry)
                            elif len(entry.head) > _MAX_HEAD_BYTES:
                                try:
                                    conn.send(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                              b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                                except OSError:
                                    pass
                                drop(conn)
                    with self._active_lock:
                        returned, self._returned = self._returned, []
                    now = time.monotonic()
                    for conn, address, pending in returned:
                        wait_on(conn, _Waiting(address, now + timeout, pending))
                    # An idle keep-alive connection, a silent one and one dripping its head byte
                    # by byte alike: the head must be whole within the timeout of its start.
                    for conn, entry in list(waiting.items()):
                        if entry.deadline <= now:
                            drop(conn)
            finally:
                for conn in waiting:
                    self.shutdown_request(conn)
                with self._active_lock:
                    returned, self._returned = self._returned, []
                for conn, _, _ in returned:
                    self.shutdown_request(conn)
                self._stopped.set()

    def _handle(self, conn: socket.socket, address: object, head: bytes) -> None:
        keep: bytes | None = None
        try:
            if not self._stop.is_set():
                keep = self.RequestHandlerClass(conn, address, self, head).kept_bytes
        except Exception:
            keep = None
            self.handle_error(conn, address)
        finally:
            with self._active_lock:
                self._active.discard(conn)
                if keep is not None and not self._stop.is_set():
                    self._returned.append((conn, address, keep))
                else:
                    keep = None
            if keep is None:
                self.shutdown_request(conn)
            else:
                try:
                    self._wake_w.send(b"r")
                except OSError:
                    pass

    def shutdown(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._stopped.wait()

    def server_close(self) -> None:
        self._stop.set()  # queued connections are closed unanswered
        super().server_close()
        # Wake workers blocked writing to stalled clients, so the process can exit now.
        with self._active_lock:
            active = list(self._active)
        for conn in active:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.pool.shutdown(wait=False)
        self._wake_r.close()
        self._wake_w.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "exaconnect-viewer"
    # The CORS origin to answer for the current request (None: send no CORS headers).
    _cors: str | None = None

    def __init__(self, request: socket.socket, client_address: object, server: _Server, head: bytes = b"") -> None:
        self._head = head
        # After the answer: the bytes of the next request already read on a keep-alive
        # connection (the selector waits for the rest), or None to close the connection.
        self.kept_bytes: bytes | None = None
        super().__init__(request, client_address, server)

    # -- plumbing ---------------------------------------------------------------------------
    def setup(self) -> None:
        # A socket timeout on every write (and any read past the head): a stalled client frees its worker.
        self.timeout = self.server.config.request_timeout_s
        super().setup()
        self.rfile.close()
        self.rfile = _RequestReader(self.connection, self._head)  # type: ignore[assignment]

    def handle(self) -> None:
        # One request per turn on the pool: a keep-alive connection waits for its next request
        # in the selector, not on a worker.
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        super().finish()
        if not self.close_connection and not self.server.stopping.is_set():
            self.kept_bytes = bytes(self.rfile.pending)  # type: ignore[attr-defined]

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler answers a method without a do_X with 501; every method we do
        # not serve is 405 instead (TRACE, CONNECT, PROPFIND, anything).
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Chunk traffic is too much to print; refusals are what a person serving data wants to see.
        if not self.server.config.quiet or str(code) in ("403", "405", "500"):
            super().log_request(code, size)

    def log_error(self, format: str, *args: object) -> None:
        # Timeouts of idle connections are routine; keep them out of a quiet server's output.
        if not self.server.config.quiet:
            super().log_error(format, *args)

    def _common_headers(self) -> None:
        if self._cors is not None:
            self.send_header("Access-Control-Allow-Origin", self._cors)
            self.send_header("Access-Control-Expose-Headers", "Content-Length, Content-Range, Content-Encoding")
        self.send_header("Vary", "Origin")
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

    def _error(self, status: HTTPStatus, headers: dict | None = None, reason: str = "") -> None:
        text = f"{status.value} {status.phrase}" + (f": {reason}" if reason else "")
        self._send(status, f"{text}\n".encode(), headers=headers)

    # -- access -----------------------------------------------------------------------------
    def _token_given(self, query: dict[str, list[str]]) -> tuple[str | None, str]:
        """The presented token and where it came from: "query", "header", "cookie" or ""."""
        if "token" in query:
            return query["token"][0], "query"
        header = self.headers.get(TOKEN_HEADER)
        if header:
            return header, "header"
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), "header"
        cookies = http.cookies.SimpleCookie()
        try:
            cookies.load(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            return None, ""
        morsel = cookies.get(TOKEN_COOKIE)
        return (morsel.value, "cookie") if morsel else (None, "")

    def _token_check(self, query: dict[str, list[str]]) -> tuple[bool, str, dict]:
        """(authorised, where the valid token came from or "", extra headers such as Set-Cookie)."""
        expected = self.server.config.token
        if expected is None:
            return True, "", {}
        given, source = self._token_given(query)
        if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
            return False, "", {}
        # The client's own fetches (scripts, workers, chunks) carry no query; a same-site
        # cookie lets them through after the user opened the link once.
        cookie = f"{TOKEN_COOKIE}={expected}; Path=/; HttpOnly; SameSite=Strict" if source == "query" else None
        return True, source, ({"Set-Cookie": cookie} if cookie else {})

    def _host_ok(self) -> bool:
        """On loopback, the Host header must be a loopback name (a DNS-rebinding page sends its own).

        Any port is accepted: the port in Host is the one the browser connected to, so a
        rebinding page always sends ours and checking it stops no attack, while an SSH tunnel
        (`ssh -L 9000:127.0.0.1:8765 node`, the usual way to view data on a cluster node)
        sends its own local port.
        """
        if not self.server.loopback:
            return True
        host = self.headers.get("Host", "").strip().lower()
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if not name:
            name, port = host, ""
        return name in _LOOPBACK_NAMES and (port == "" or port.isdigit())

    def _origin_allowed(self, origin: str, explicit_token: bool) -> bool:
        config = self.server.config
        if origin in self.server.own_origins or origin in config.allow_origins or "*" in config.allow_origins:
            return True
        if _HOST.match(self.headers.get("Host", "")) and origin == f"http://{self.headers['Host']}":
            # The page's origin is this server as the browser reaches it (a tunnel's port, or
            # a name beyond loopback); on loopback the Host is already known to be a loopback name.
            return True
        # Another site's page may read only with the token in hand (never by the ambient cookie).
        return explicit_token

    def _admit(self, query: dict[str, list[str]]) -> dict | None:
        """Host, Origin and token checks for one request; the extra headers, or None once refused."""
        self._cors = None
        if len(self.headers.get_all("Host") or []) > 1:
            # Which one a proxy or a check would read is anybody's guess: refuse, as RFC 9112 asks.
            self._error(HTTPStatus.BAD_REQUEST, reason="more than one Host header")
            return None
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, reason="Host header does not name this server")
            return None
        ok, source, extra = self._token_check(query)
        origin = self.headers.get("Origin")
        if origin is not None:
            if not self._origin_allowed(origin, ok and source in ("query", "header") and self.server.config.token is not None):
                self._error(HTTPStatus.FORBIDDEN, reason="requests from this origin are not allowed")
                return None
            self._cors = origin
        if not ok:
            self._error(HTTPStatus.FORBIDDEN)
            return None
        return extra

    # -- methods ----------------------------------------------------------------------------
    def do_OPTIONS(self) -> None:
        """CORS preflight (a Range or token header from another origin's client)."""
        self._cors = None
        origin = self.headers.get("Origin")
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, reason="Host header does not name this server")
            return
        # A preflight never carries credentials; with a token configured, the request that
        # follows must present it, so any origin may ask.
        if origin is None or not (self._origin_allowed(origin, False) or self.server.config.token is not None):
            self._error(HTTPStatus.FORBIDDEN, reason="requests from this origin are not allowed")
            return
        self._cors = origin
        self.send_response(HTTPStatus.NO_CONTENT)
        self._common_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", f"Range, Authorization, {TOKEN_HEADER}")
        self.send_header("Access-Control-Max-Age", "600")
        if self.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
            # Chrome's Private Network Access: a public https client asking a loopback server.
            self.send_header("Access-Control-Allow-Private-Network", "true")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _not_allowed(self) -> None:
        self._cors = None
        self.close_connection = True  # the request body is not read
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, HEAD, OPTIONS"})

    def do_POST(self) -> None:
        if self.path.partition("?")[0] == f"/state/{CLIENT_SESSION}":
            # The bundled client reports each view change here; 412 ("the server's state is
            # newer") is the answer it drops silently, and nothing is stored.
            self.close_connection = True
            query = urllib.parse.parse_qs(self.path.partition("?")[2], keep_blank_values=True)
            if self._admit(query) is not None:
                self._error(HTTPStatus.PRECONDITION_FAILED)
            return
        self._not_allowed()

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._route()
        except OSError:  # the client went away or stalled past the timeout mid-answer
            self.close_connection = True

    def _route(self) -> None:
        raw_path, _, raw_query = self.path.partition("?")
        query = urllib.parse.parse_qs(raw_query, keep_blank_values=True)
        cookie = self._admit(query)
        if cookie is None:
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
            elif parts[0] == STATES_PREFIX.strip("/") and len(parts) == 2:
                self._state_file(parts[1], cookie)
            elif parts[0] == TASKS_PREFIX.strip("/") and self.server.config.tasks_file is not None:
                self._tasks(parts[1:])
            else:
                self._error(HTTPStatus.NOT_FOUND)
        except PathRefused:
            self._error(HTTPStatus.FORBIDDEN)
        except PathMissing:
            self._error(HTTPStatus.NOT_FOUND)
        except http_files.RangeNotSatisfiable as exc:
            self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{exc.size}"})
        except InputError as exc:  # a malformed task file: say so rather than hide the layer
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"{exc}\n".encode())

    # -- content ----------------------------------------------------------------------------
    def _file(self, root: Path, parts: list[str], extra: dict) -> None:
        found = resolve_file(root, parts)
        headers = dict(extra)
        ctype = http_files.content_type(parts[-1] if parts else "")
        if found.encoding is not None and not http_files.accepts(self.headers.get("Accept-Encoding"), found.encoding):
            # Compressed chunks are small; decode for a client that cannot.
            self._send(HTTPStatus.OK, http_files.decode(found.path.read_bytes(), found.encoding), ctype, headers)
            return
        with open(found.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            status, start, stop = HTTPStatus.OK, 0, size
            if found.encoding is not None:
                headers["Content-Encoding"] = found.encoding  # ranges of encoded bytes are not offered
            else:
                headers["Accept-Ranges"] = "bytes"
                span = http_files.byte_range(self.headers.get("Range"), size)
                if span is not None:
                    status, (start, stop) = HTTPStatus.PARTIAL_CONTENT, span
                    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
            self.send_response(status)
            self._common_headers()
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(stop - start))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            # Only the requested bytes are read: shard files can be gigabytes.
            f.seek(start)
            left = stop - start
            while left > 0:
                block = f.read(min(_COPY_BLOCK, left))
                if not block:  # the file shrank while being served; the client sees a short body
                    self.close_connection = True
                    break
                self.wfile.write(block)
                left -= len(block)

    def _state_file(self, name: str, extra: dict) -> None:
        """A saved viewer state: the first state folder that has it."""
        if not _STATE_NAME.match(name):
            raise PathMissing(f"{name!r} is not a state file name")
        for folder in self.server.config.state_dirs:
            if (folder / name).is_file():
                self._file(folder, [name], extra)
                return
        raise PathMissing(f"no state {name} in {', '.join(map(str, self.server.config.state_dirs)) or 'no state folder'}")

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
        if not self.server.event_streams.acquire(blocking=False):
            # Too many open tabs: the client's EventSource retries later.
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, {"Retry-After": "10"}, reason="too many open viewers")
            return
        try:
            self.send_response(HTTPStatus.OK)
            self._common_headers()
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.close_connection = True
            if self.command == "HEAD":
                return
            self.wfile.write(self._state_message() if wants_state else b": exaconnect\n\n")
            self.wfile.flush()
            while not self.server.stopping.wait(min(_KEEPALIVE_S, self.server.config.request_timeout_s / 2)):
                self.wfile.write(b": keepalive\n\n")
                self.wfile.flush()
        finally:
            self.server.event_streams.release()


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
        state_dir: str | os.PathLike | None = None,
        allow_origins: Sequence[str] = (),
        max_threads: int = DEFAULT_MAX_THREADS,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ):
        infos = [layer if isinstance(layer, LayerInfo) else inspect_layer(layer) for layer in layers]
        if not infos:
            raise InputError("no layers given; expected at least one layer path or URL")
        if token is not None and (not token or not token.isprintable() or any(c in token for c in " ;,\"\\")):
            raise InputError("--token must be non-empty printable text without spaces, ';', ',', quotes or backslashes")
        origins = tuple(check_origin(origin) for origin in allow_origins)
        if max_threads < 2:
            raise InputError(f"--max-threads {max_threads}; expected at least 2")
        if not request_timeout_s > 0:
            raise InputError(f"--request-timeout {request_timeout_s}; expected a positive number of seconds")
        state_dirs = ([Path(local_path(str(state_dir)) or state_dir).resolve()] if state_dir is not None else [])
        state_dirs += [d for d in default_state_dirs(infos) if d not in state_dirs]
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
            state_dirs=tuple(state_dirs),
            allow_origins=origins,
            max_threads=max_threads,
            request_timeout_s=float(request_timeout_s),
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
    state_dir: str | os.PathLike | None = None,
    allow_origins: Sequence[str] = (),
) -> None:
    """Serve the layers and the viewer until interrupted; prints the URL to open."""
    server = ViewerServer(layers, port=port, bind=bind, token=token, tasks_file=tasks_file, state_dir=state_dir,
                          allow_origins=allow_origins)
    print(f"exaconnect viewer on {server.origin} serving {', '.join(server.config.roots) or 'no local layers'}"
          f"; states from {', '.join(map(str, server.config.state_dirs)) or 'nowhere'}")
    print(server.url, flush=True)
    print(f"shareable link (state in the URL): {server.link}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.close()
