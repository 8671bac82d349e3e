"""The local viewer server over real HTTP: safety, headers, live data, token, task boxes."""

from __future__ import annotations

import gzip
import http.client
import json
import struct
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from exaconnect.errors import InputError, LayerError
from exaconnect.viewer.server import TOKEN_COOKIE, TOKEN_HEADER, ViewerServer
from exaconnect.viewer.tasks import TaskBox, write_task_states

SECRET = b"not for the browser"


def _make_layer(path: Path) -> np.ndarray:
    from cloudvolume import CloudVolume

    info = CloudVolume.create_new_info(1, "image", "uint8", "raw", [10, 10, 10], [0, 0, 0], [64, 32, 32], chunk_size=[32, 32, 32])
    vol = CloudVolume(f"file://{path}", info=info, compress=True, progress=False)
    vol.commit_info()
    data = np.arange(64 * 32 * 32, dtype=np.uint32).reshape(64, 32, 32).astype(np.uint8)
    vol[:32, :, :] = data[:32]  # the second chunk is left unwritten: a missing chunk
    return data


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("viewer_server")
    path = base / "em"
    _make_layer(path)
    (base / "secret.txt").write_bytes(SECRET)
    (path / "escape").symlink_to(base / "secret.txt")
    (path / "escape_dir").symlink_to(base, target_is_directory=True)
    return path


@pytest.fixture(scope="module")
def tasks_file(layer: Path) -> Path:
    return layer.parent / "tasks.json"


@pytest.fixture(scope="module")
def server(layer: Path, tasks_file: Path) -> Iterator[ViewerServer]:
    with ViewerServer([str(layer)], tasks_file=tasks_file) as running:
        yield running


def get(server: ViewerServer, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    """One raw request: http.client sends the path exactly as given (no normalisation of `..`)."""
    connection = http.client.HTTPConnection(_host(server), server.port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _host(server: ViewerServer) -> str:
    return server.bind if server.bind not in ("", "0.0.0.0", "localhost") else "127.0.0.1"


CHUNK = "/data/em/10_10_10/0-32_0-32_0-32"


def test_gzip_chunk_is_served_with_content_encoding_and_cors(server: ViewerServer, layer: Path) -> None:
    own = f"http://localhost:{server.port}"  # the bundled client opened by another of our names
    status, headers, body = get(server, CHUNK, {"Accept-Encoding": "gzip, deflate", "Origin": own})
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert headers["access-control-allow-origin"] == own
    assert headers["content-type"] == "application/octet-stream"
    on_disk = (layer / "10_10_10" / "0-32_0-32_0-32.gz").read_bytes()
    assert body == on_disk and len(gzip.decompress(body)) == 32 * 32 * 32


def test_gzip_chunk_is_decoded_for_a_client_without_gzip(server: ViewerServer) -> None:
    status, headers, body = get(server, CHUNK)
    assert status == 200 and "content-encoding" not in headers and len(body) == 32**3


def test_brotli_file_is_decoded_unless_the_client_accepts_br(server: ViewerServer, layer: Path) -> None:
    import brotli

    payload = bytes(range(256)) * 8
    path = layer / "10_10_10" / "extra.br"
    path.write_bytes(brotli.compress(payload))
    try:
        status, headers, body = get(server, "/data/em/10_10_10/extra", {"Accept-Encoding": "gzip"})
        assert status == 200 and "content-encoding" not in headers and body == payload
        status, headers, body = get(server, "/data/em/10_10_10/extra", {"Accept-Encoding": "gzip, br"})
        assert status == 200 and headers["content-encoding"] == "br" and brotli.decompress(body) == payload
    finally:
        path.unlink()


def test_info_is_json(server: ViewerServer) -> None:
    status, headers, body = get(server, "/data/em/info")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["type"] == "image"
    status, headers, _ = get(server, "/data/em/info", method="HEAD")
    assert status == 200 and int(headers["content-length"]) > 0


def test_missing_chunk_is_404_with_cors(server: ViewerServer) -> None:
    status, headers, _ = get(server, "/data/em/10_10_10/32-64_0-32_0-32", {"Origin": server.origin})
    assert status == 404 and headers["access-control-allow-origin"] == server.origin


@pytest.mark.parametrize(
    "path",
    [
        "/data/em/../secret.txt",
        "/data/em/%2e%2e/secret.txt",
        "/data/em/%2E%2E/secret.txt",
        "/data/em/%252e%252e/secret.txt",
        "/data/em/..%2fsecret.txt",
        "/data/em/%2e%2e%2fsecret.txt",
        "/data/em/..\\secret.txt",
        "/data/em/%5c..%5csecret.txt",
        "/data/em/escape",
        "/data/em/escape_dir/secret.txt",
        "/data/../../../../etc/passwd",
        "/v/exaconnect/../../../etc/passwd",
        "/v/exaconnect/%2e%2e/%2e%2e/viewer_state.py",
    ],
)
def test_escapes_are_refused(server: ViewerServer, path: str) -> None:
    status, _, body = get(server, path)
    assert status in (403, 404)
    assert SECRET not in body and b"root:" not in body


def test_only_given_roots_and_no_listings(server: ViewerServer) -> None:
    assert get(server, "/data/other/info")[0] == 404
    assert get(server, "/data/em/")[0] == 404
    assert get(server, "/data/em/10_10_10")[0] == 404
    assert get(server, "/etc/passwd")[0] == 404


def test_view_changes_posted_by_the_client_are_declined(server: ViewerServer) -> None:
    assert get(server, "/state/exaconnect", method="POST")[0] == 412


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_read_only(server: ViewerServer, layer: Path, method: str) -> None:
    before = (layer / "info").read_bytes()
    status, headers, _ = get(server, "/data/em/info", method=method)
    assert status == 405 and "GET" in headers["allow"]
    assert (layer / "info").read_bytes() == before


def test_chunks_written_after_startup_are_served(server: ViewerServer, layer: Path) -> None:
    from cloudvolume import CloudVolume

    late = "/data/em/10_10_10/32-64_0-32_0-32"
    vol = CloudVolume(f"file://{layer}", compress=True, progress=False)
    vol[32:64, :, :] = np.full((32, 32, 32, 1), 7, dtype=np.uint8)
    try:
        status, _, body = get(server, late)
        assert status == 200 and set(body) == {7}
    finally:
        (layer / "10_10_10" / "32-64_0-32_0-32.gz").unlink()
    assert get(server, late)[0] == 404


def test_range_request_on_a_plain_file(server: ViewerServer, layer: Path) -> None:
    info = (layer / "info").read_bytes()
    status, headers, body = get(server, "/data/em/info", {"Range": "bytes=2-9"})
    assert status == 206 and body == info[2:10]
    assert headers["content-range"] == f"bytes 2-9/{len(info)}"
    assert get(server, "/data/em/info", {"Range": f"bytes={len(info)}-"})[0] == 416


def test_bundled_client_is_served(server: ViewerServer) -> None:
    status, headers, body = get(server, "/v/exaconnect/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    scripts = [s.split('"')[0] for s in body.decode().split('src="')[1:]]
    assert scripts and any(s.startswith("main.") for s in scripts)
    for script in scripts:
        status, headers, js = get(server, f"/v/exaconnect/{script}", method="HEAD")
        assert status == 200 and headers["content-type"] == "application/javascript"


def _first_event(server: ViewerServer, headers: dict | None = None, query: str = "?c=1&gc=&gs=") -> dict:
    connection = http.client.HTTPConnection(_host(server), server.port, timeout=10)
    try:
        connection.request("GET", f"/events/exaconnect{query}", headers=headers or {})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        line = response.fp.readline()
        if line.startswith(b":"):
            return {}  # a comment: no state asked for
        assert line.startswith(b"data: ")
        return json.loads(line[len(b"data: ") :])
    finally:
        connection.close()


def test_event_stream_carries_the_state_for_the_bundled_client(server: ViewerServer) -> None:
    # The first event is the whole viewer state, for a client opened without a URL fragment.
    message = _first_event(server)
    assert message["k"] == "s" and message["s"] == server.state
    assert message["s"]["layers"][0]["source"][0]["url"] == f"precomputed://{server.origin}/data/em"
    # A client opened on a link (state in the fragment) does not ask for the state.
    assert _first_event(server, query="?c=1&gc=") == {}


def test_event_stream_names_data_by_the_host_the_browser_used(layer: Path, tasks_file: Path) -> None:
    # Beyond loopback (here 127.0.0.2, which we treat as such) any Host name is accepted, with the token.
    with ViewerServer([str(layer)], tasks_file=tasks_file, bind="127.0.0.2", token="tok") as server:
        remote = _first_event(server, {"Host": "em-server.lab:8765", TOKEN_HEADER: "tok"})["s"]
        assert remote["layers"][0]["source"][0]["url"] == "precomputed://http://em-server.lab:8765/data/em"
        assert remote["layers"][-1]["source"][0]["url"] == "precomputed://http://em-server.lab:8765/tasks"
        odd = _first_event(server, {"Host": 'x"/><script>:1', TOKEN_HEADER: "tok"})["s"]  # not a host: left alone
        assert odd == server.state


def test_event_streams_are_capped(layer: Path) -> None:
    import socket

    with ViewerServer([str(layer)], max_threads=4) as server:  # one stream at most
        with socket.create_connection((_host(server), server.port), timeout=10) as first:
            first.sendall(f"GET /events/exaconnect HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
            assert first.recv(100).startswith(b"HTTP/1.1 200")
            assert get(server, "/events/exaconnect")[0] == 503
            assert get(server, "/data/em/info")[0] == 200


def test_root_redirects_to_the_client_and_the_link_holds_the_state(server: ViewerServer) -> None:
    status, headers, _ = get(server, "/")
    assert status == 302 and headers["location"] == "/v/exaconnect/"
    assert server.link.startswith(f"{server.origin}/v/exaconnect/#!")
    state = json.loads(urllib.parse.unquote(server.link.split("#!", 1)[1]))
    assert state["layers"][0]["source"][0]["url"] == f"precomputed://{server.origin}/data/em"
    assert state["layers"][-1]["source"][0]["url"] == f"precomputed://{server.origin}/tasks"


def test_task_boxes_follow_the_task_file(server: ViewerServer, tasks_file: Path) -> None:
    status, _, body = get(server, "/tasks/spatial0/0_0_0")
    assert status == 200 and struct.unpack("<Q", body[:8]) == (0,)
    write_task_states(tasks_file, [TaskBox((0, 0, 0, 32, 32, 32), "done"), TaskBox((32, 0, 0, 64, 32, 32), "running")])
    status, _, body = get(server, "/tasks/spatial0/0_0_0")
    assert status == 200 and struct.unpack("<Q", body[:8]) == (2,)
    info = json.loads(get(server, "/tasks/info")[2])
    assert info["@type"] == "neuroglancer_annotations_v1" and info["upper_bound"] == [64, 32, 32]
    assert info["dimensions"]["x"] == [10e-9, "m"]  # the layer's resolution
    assert get(server, "/tasks/by_id/1")[0] == 200 and get(server, "/tasks/by_id/2")[0] == 404
    tasks_file.write_text("{broken")
    status, _, body = get(server, "/tasks/info")
    assert status == 500 and str(tasks_file).encode() in body
    tasks_file.unlink()


def test_token_is_enforced(layer: Path) -> None:
    token = "s3cr3t-token"
    with ViewerServer([str(layer)], token=token) as server:
        assert get(server, "/data/em/info")[0] == 403
        assert get(server, "/v/exaconnect/")[0] == 403
        assert get(server, "/data/em/info?token=wrong")[0] == 403
        assert get(server, "/data/em/info", {"Cookie": f"{TOKEN_COOKIE}=wrong"})[0] == 403
        status, headers, _ = get(server, f"/v/exaconnect/?token={token}")
        assert status == 200 and f"{TOKEN_COOKIE}={token}" in headers["set-cookie"]
        assert "HttpOnly" in headers["set-cookie"]
        assert get(server, "/data/em/info", {"Cookie": f"{TOKEN_COOKIE}={token}"})[0] == 200
        assert get(server, "/data/em/info", {TOKEN_HEADER: token})[0] == 200
        assert get(server, "/data/em/info", {"Authorization": f"Bearer {token}"})[0] == 200
        assert server.url == f"{server.origin}/v/exaconnect/?token={token}"
        # Even with the token, escapes stay refused.
        assert get(server, f"/data/em/../secret.txt?token={token}")[0] in (403, 404)


def test_binding_beyond_loopback_makes_up_a_token(layer: Path) -> None:
    server = ViewerServer([str(layer)], bind="127.0.0.2")
    try:
        assert server.config.token and "?token=" in server.url
    finally:
        server.close()


def test_bad_arguments_name_the_parameter(layer: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--token"):
        ViewerServer([str(layer)], token="a b")
    with pytest.raises(InputError, match="--port"):
        ViewerServer([str(layer)], port=99999)
    with pytest.raises(LayerError, match=str(tmp_path / "absent")):
        ViewerServer([str(tmp_path / "absent")])


# -- hardening (issue 13 item 10) -------------------------------------------------------------

def _raw(port: int, data: bytes) -> bytes:
    """Send bytes exactly as given and read the whole answer (the server closes after it)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_half_open_connections_hold_no_threads_and_are_closed(layer: Path) -> None:
    """Many idle or half-sent connections: a bounded pool, a real request still served, all closed by the server."""
    import socket
    import threading
    import time

    before = threading.active_count()
    with ViewerServer([str(layer)], request_timeout_s=1.0, max_threads=4) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(150)]
        partial = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(12)]
        try:
            for sock in partial:  # a request line, then silence
                sock.sendall(b"GET /data/em/info HTTP/1.1\r\n")
            time.sleep(0.5)
            assert threading.active_count() <= before + 1 + 4 + 1, threading.active_count()
            status, _, body = get(server, "/data/em/info")
            assert status == 200 and json.loads(body)["type"] == "image"
            started = time.monotonic()
            for sock in idle + partial:  # each is closed by the server (end of stream), unanswered
                sock.settimeout(10)
                try:
                    assert sock.recv(1024) == b""
                except ConnectionResetError:
                    pass
            assert time.monotonic() - started < 8, "the server kept idle connections open"
        finally:
            for sock in idle + partial:
                sock.close()
        assert threading.active_count() <= before + 1 + 4 + 1


def test_a_request_dripped_byte_by_byte_is_cut_off(layer: Path) -> None:
    """Each byte within the socket timeout, the whole request never: the request timeout still ends it."""
    import socket
    import time

    with ViewerServer([str(layer)], request_timeout_s=1.0, max_threads=2) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            started = time.monotonic()
            request = b"GET /data/em/info HTTP/1.1\r\nX-Slow: " + b"a" * 100
            closed = False
            for byte in request:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                sock.settimeout(0.3)
                try:
                    if sock.recv(1024) == b"":
                        closed = True
                        break
                except socket.timeout:
                    pass
                except OSError:
                    closed = True
                    break
            assert closed and time.monotonic() - started < 5, "a dripping client held its worker"
        assert get(server, "/data/em/info")[0] == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", "127.0.0.2:{port}",
                                  "localhost.:{port}", "localhost:x", "[::2]:{port}", ""])
def test_foreign_host_header_is_refused_on_loopback(server: ViewerServer, host: str) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own name as Host."""
    status, _, body = get(server, "/data/em/info", {"Host": host.format(port=server.port)})
    assert status == 403 and b'"type"' not in body


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}", "localhost",
                                  "localhost:9000"])
def test_own_host_names_are_accepted(server: ViewerServer, host: str) -> None:
    """Loopback names only, at any port: an SSH tunnel (ssh -L 9000:127.0.0.1:8765) sends its own."""
    assert get(server, "/data/em/info", {"Host": host.format(port=server.port)})[0] == 200


def test_a_client_through_a_tunnel_gets_cors_for_its_own_origin(server: ViewerServer) -> None:
    headers = {"Host": "localhost:9000", "Origin": "http://localhost:9000"}
    status, answer, _ = get(server, "/data/em/info", headers)
    assert status == 200 and answer["access-control-allow-origin"] == "http://localhost:9000"
    assert get(server, "/data/em/info", {"Host": "localhost:9000", "Origin": "http://localhost:3000"})[0] == 403


def test_cors_only_for_the_servers_own_client(server: ViewerServer) -> None:
    status, headers, body = get(server, "/data/em/info", {"Origin": "https://evil.example"})
    assert status == 403 and "access-control-allow-origin" not in headers and b'"type"' not in body
    assert get(server, "/data/em/info", {"Origin": "null"})[0] == 403
    for own in (server.origin, f"http://localhost:{server.port}"):
        status, headers, _ = get(server, "/data/em/info", {"Origin": own})
        assert status == 200 and headers["access-control-allow-origin"] == own and "Origin" in headers["vary"]
    status, headers, _ = get(server, "/data/em/info")  # same-origin requests carry no Origin
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_preflight_only_for_own_origin(server: ViewerServer) -> None:
    ask = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "range"}
    status, headers, _ = get(server, CHUNK, {"Origin": "https://evil.example", **ask}, method="OPTIONS")
    assert status == 403 and "access-control-allow-origin" not in headers
    own = f"http://localhost:{server.port}"
    status, headers, _ = get(server, CHUNK, {"Origin": own, **ask, "Access-Control-Request-Private-Network": "true"}, method="OPTIONS")
    assert status == 204 and headers["access-control-allow-origin"] == own
    assert "range" in headers["access-control-allow-headers"].lower()
    assert headers["access-control-allow-private-network"] == "true"


def test_allowed_origins_and_token_holders_get_cors(layer: Path) -> None:
    public = "https://neuroglancer-demo.appspot.com"
    with ViewerServer([str(layer)], allow_origins=[public]) as server:
        status, headers, _ = get(server, "/data/em/info", {"Origin": public})
        assert status == 200 and headers["access-control-allow-origin"] == public
        assert get(server, "/data/em/info", {"Origin": "https://other.example"})[0] == 403
    with ViewerServer([str(layer)], bind="127.0.0.2", token="tok") as server:
        status, headers, _ = get(server, "/data/em/info", {"Origin": "https://other.example", TOKEN_HEADER: "tok", "Host": "em-server.lab:1"})
        assert status == 200 and headers["access-control-allow-origin"] == "https://other.example"
        assert get(server, "/data/em/info", {"Origin": "https://other.example", "Cookie": f"{TOKEN_COOKIE}=tok"})[0] == 403


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_range_request_reads_only_the_range(server: ViewerServer, layer: Path) -> None:
    if not Path("/proc/self/io").exists():
        pytest.skip("/proc/self/io not available (not Linux)")
    big = layer / "10_10_10" / "shard.bin"
    size = 64 * 1024 * 1024
    with open(big, "wb") as f:  # sparse: nothing is written to disk
        f.truncate(size)
        f.seek(size - 4)
        f.write(b"tail")
    try:
        before = _rchar()
        status, headers, body = get(server, "/data/em/10_10_10/shard.bin", {"Range": "bytes=-4"})
        assert status == 206 and body == b"tail" and headers["content-range"] == f"bytes {size - 4}-{size - 1}/{size}"
        status, headers, body = get(server, "/data/em/10_10_10/shard.bin", {"Range": "bytes=1000-1999"})
        assert status == 206 and body == bytes(1000) and headers["content-length"] == "1000"
        status, headers, body = get(server, "/data/em/10_10_10/shard.bin", method="HEAD")
        assert status == 200 and headers["content-length"] == str(size) and headers["accept-ranges"] == "bytes"
        assert _rchar() - before < 4 * 1024 * 1024, "the server read the whole file for a range"
    finally:
        big.unlink()


@pytest.mark.parametrize("spec", ["bytes=9-2", "bytes=100000-", "bytes=100000-100010", "bytes=-0"])
def test_unsatisfiable_ranges_are_416(server: ViewerServer, layer: Path, spec: str) -> None:
    size = len((layer / "info").read_bytes())
    status, headers, _ = get(server, "/data/em/info", {"Range": spec})
    assert status == 416 and headers["content-range"] == f"bytes */{size}"


@pytest.mark.parametrize("method", ["PATCH", "TRACE", "PROPFIND", "MKCOL", "FOO"])
def test_every_other_method_is_405(server: ViewerServer, method: str) -> None:
    status, headers, _ = get(server, "/data/em/info", method=method)
    assert status == 405 and headers["allow"] == "GET, HEAD, OPTIONS"


def test_connect_is_405(server: ViewerServer) -> None:
    answer = _raw(server.port, f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 405")


def test_saved_states_are_served(server: ViewerServer, layer: Path, tmp_path: Path) -> None:
    from exaconnect.viewer.links import short_link

    short = short_link([str(layer)], server=server.origin, statistics=False)
    path = short.state_url[len(server.origin):]
    assert path.startswith("/states/ng-")
    status, headers, body = get(server, path)
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == json.loads(Path(short.state_location).read_text())
    assert get(server, "/states/absent.json")[0] == 404
    for bad in ("/states/../em/info", "/states/%2e%2e/em/info", "/states/.x.json", "/states/info", "/states/a/b.json"):
        assert get(server, bad)[0] in (403, 404), bad
    Path(short.state_location).unlink()
    # A folder given to `view --state-dir` is searched first.
    with ViewerServer([str(layer)], state_dir=tmp_path) as other:
        (tmp_path / "mine.json").write_text("{}")
        assert get(other, "/states/mine.json")[2] == b"{}"


def test_clients_that_send_one_byte_and_stop_hold_no_worker(layer: Path) -> None:
    """Issue 24, item 8: a request runs on the pool only once its line and headers are whole, so
    forty clients that send one byte and stop leave a two-thread pool free for real requests."""
    import socket
    import time

    with ViewerServer([str(layer)], request_timeout_s=5.0, max_threads=2) as server:
        stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(40)]
        try:
            for sock in stalled:
                sock.sendall(b"G")
            time.sleep(0.3)
            started = time.monotonic()
            for _ in range(4):
                status, _, body = get(server, "/data/em/info")
                assert status == 200 and json.loads(body)["type"] == "image"
            assert time.monotonic() - started < 2.5, "requests waited behind stalled clients"
        finally:
            for sock in stalled:
                sock.close()


def test_idle_keep_alive_connections_hold_no_worker_and_are_served_again(layer: Path) -> None:
    """A browser keeps its connections open between requests: between them they wait in the
    selector, so more idle keep-alive connections than threads still leave the pool free, and
    each is answered again when it asks."""
    import time

    with ViewerServer([str(layer)], request_timeout_s=5.0, max_threads=2) as server:
        connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(6)]
        try:
            for conn in connections:
                conn.request("GET", "/data/em/info")
                response = conn.getresponse()
                assert response.status == 200 and response.getheader("Connection") != "close"
                response.read()
            started = time.monotonic()
            assert get(server, "/data/em/info")[0] == 200
            assert time.monotonic() - started < 2.5, "idle keep-alive connections held the pool"
            for conn in connections:  # the same sockets, a second request each
                conn.request("GET", "/data/em/info")
                response = conn.getresponse()
                assert response.status == 200 and json.loads(response.read())["type"] == "image"
        finally:
            for conn in connections:
                conn.close()


def test_pipelined_requests_are_each_answered_in_order(layer: Path) -> None:
    """Two requests in one packet: the second one's bytes, read with the first, are not lost."""
    request = b"GET /data/em/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    closing = b"GET /data/em/nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with ViewerServer([str(layer)], request_timeout_s=5.0, max_threads=2) as server:
        answer = _raw(server.port, request + closing)
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 404" in rest


def test_an_oversized_request_head_is_refused_before_it_reaches_a_worker(layer: Path) -> None:
    with ViewerServer([str(layer)], request_timeout_s=5.0, max_threads=2) as server:
        head = b"GET /data/em/info HTTP/1.1\r\n" + b"X-Big: " + b"a" * (80 * 1024)
        answer = _raw(server.port, head)
        assert answer.startswith(b"HTTP/1.1 431")
        assert get(server, "/data/em/info")[0] == 200
