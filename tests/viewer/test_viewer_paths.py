"""Pure pieces of the viewer: request-path safety, HTTP details, root names, the task-state format."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.viewer import http_files
from exaconnect.viewer.roots import root_names, server_url
from exaconnect.viewer.safepath import PathMissing, PathRefused, resolve_file, split_request_path
from exaconnect.viewer.tasks import (
    STATE_COLORS,
    TASK_STATES,
    TaskBox,
    annotation_info,
    encode_by_id,
    encode_spatial_chunk,
    read_task_states,
    write_task_states,
)


@pytest.mark.parametrize(
    "raw",
    [
        "/data/a/../b/info",
        "/data/a/%2e%2e/b/info",
        "/data/a/%2E%2E/b/info",
        "/data/a/%252e%252e/b/info",  # double-encoded: refused before any second decoding
        "/data/a/..%2finfo",
        "/data/a/..%2Finfo",
        "/data/a/..\\info",
        "/data/a/%5c..%5cinfo",
        "/data/a/./info",
        "/data/a/.hidden",
        "/data/a/info%00.png",
        "/data/a/%c0%ae%c0%ae/info",  # overlong UTF-8 dots are not valid UTF-8
    ],
)
def test_escaping_request_paths_are_refused(raw: str) -> None:
    with pytest.raises(PathRefused):
        split_request_path(raw)


def test_plain_request_paths_decode_once() -> None:
    assert split_request_path("/data/seg/mesh/134467%3A0") == ["data", "seg", "mesh", "134467:0"]
    assert split_request_path("//data//img/10_10_10/0-64_0-64_0-64") == ["data", "img", "10_10_10", "0-64_0-64_0-64"]


def test_resolve_prefers_plain_then_gzip_then_brotli(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"plain")
    (tmp_path / "a.gz").write_bytes(gzip.compress(b"zipped"))
    (tmp_path / "b.gz").write_bytes(gzip.compress(b"zipped"))
    (tmp_path / "c.br").write_bytes(b"brotli bytes")
    assert resolve_file(tmp_path, ["a"]).encoding is None
    assert resolve_file(tmp_path, ["b"]).encoding == "gzip"
    assert resolve_file(tmp_path, ["c"]).encoding == "br"
    with pytest.raises(PathMissing):
        resolve_file(tmp_path, ["d"])
    with pytest.raises(PathMissing):  # a directory is never listed
        resolve_file(tmp_path, [])


def test_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "secret"
    root.mkdir()
    outside.write_text("secret")
    (root / "link").symlink_to(outside)
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    (root / "inside").write_text("ok")
    (root / "ok_link").symlink_to(root / "inside")
    with pytest.raises(PathRefused):
        resolve_file(root, ["link"])
    with pytest.raises(PathRefused):
        resolve_file(root, ["dirlink", "secret"])
    assert resolve_file(root, ["ok_link"]).path.read_text() == "ok"


def test_byte_ranges() -> None:
    assert http_files.byte_range(None, 10) is None
    assert http_files.byte_range("bytes=2-4", 10) == (2, 5)
    assert http_files.byte_range("bytes=7-", 10) == (7, 10)
    assert http_files.byte_range("bytes=-3", 10) == (7, 10)
    assert http_files.byte_range("bytes=5-100", 10) == (5, 10)
    assert http_files.byte_range("bytes=0-1,4-5", 10) is None
    with pytest.raises(http_files.RangeNotSatisfiable):
        http_files.byte_range("bytes=10-", 10)


def test_accept_encoding_and_content_types() -> None:
    assert http_files.accepts("gzip, deflate, br", "gzip")
    assert http_files.accepts("gzip, deflate, br", "br")
    assert not http_files.accepts("gzip, deflate", "br")
    assert not http_files.accepts("gzip;q=0", "gzip")
    assert not http_files.accepts(None, "gzip")
    assert http_files.content_type("info") == "application/json"
    assert http_files.content_type("134467:0") == "application/json"
    assert http_files.content_type("0-64_0-64_0-64") == "application/octet-stream"
    assert http_files.content_type("main.js") == "application/javascript"


def test_root_names_are_unique_and_url_safe(tmp_path: Path) -> None:
    names = root_names([tmp_path / "a" / "image", tmp_path / "b" / "image", tmp_path / "we ird#"])
    assert list(names) == ["image", "image-2", "we_ird_"]
    assert names["image-2"] == tmp_path / "b" / "image"


def test_server_url_for_binds() -> None:
    assert server_url("127.0.0.1", 80) == "http://127.0.0.1:80"
    assert server_url("0.0.0.0", 8765) == "http://127.0.0.1:8765"
    assert server_url("::1", 1) == "http://[::1]:1"
    with pytest.raises(InputError, match="--port"):
        server_url("127.0.0.1", 70000)


def test_task_file_round_trip_and_encoding(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    assert read_task_states(path).tasks == ()  # not written yet: no tasks, no error
    boxes = [TaskBox((0, 0, 0, 64, 64, 64), "done"), TaskBox((64, 0, 0, 128, 64, 32), "failed")]
    write_task_states(path, boxes, resolution=(8, 8, 40))
    states = read_task_states(path)
    assert states.tasks == tuple(boxes) and states.resolution == (8.0, 8.0, 40.0)
    assert [p.name for p in tmp_path.iterdir()] == ["tasks.json"]  # no temp file left behind

    info = annotation_info(states, (10, 10, 10))
    assert info["dimensions"]["z"] == [40e-9, "m"]
    assert info["lower_bound"] == [0, 0, 0] and info["upper_bound"] == [128, 64, 64]
    assert info["properties"][0]["enum_labels"] == list(TASK_STATES)

    chunk = encode_spatial_chunk(states)
    (count,) = struct.unpack("<Q", chunk[:8])
    assert count == 2 and len(chunk) == 8 + 2 * 28 + 2 * 8
    geometry = np.frombuffer(chunk[8 : 8 + 24], dtype="<f4")
    assert geometry.tolist() == [0, 0, 0, 64, 64, 64]
    second = chunk[8 + 28 : 8 + 56]
    assert second[24] == TASK_STATES.index("failed") and tuple(second[25:28]) == STATE_COLORS["failed"]
    assert struct.unpack("<QQ", chunk[-16:]) == (0, 1)
    assert encode_by_id(states, 1) == second and encode_by_id(states, 2) is None


def test_a_bare_list_is_a_task_file(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"bbox": [0, 0, 0, 1, 1, 1], "state": "running"}]))
    assert read_task_states(path).tasks == (TaskBox((0, 0, 0, 1, 1, 1), "running"),)


@pytest.mark.parametrize(
    "document, message",
    [
        ([{"bbox": [0, 0, 0, 1, 1], "state": "done"}], r"tasks\[0\]\.bbox"),
        ([{"bbox": [0, 0, 0, 0, 1, 1], "state": "done"}], "is empty"),
        ([{"bbox": [0, 0, 0, 1, 1, 1], "state": "exploded"}], r"tasks\[0\]\.state"),
        ({"resolution": [1, 1], "tasks": []}, "resolution"),
        ("nope", "expected a list"),
    ],
)
def test_malformed_task_files_name_the_file_and_field(tmp_path: Path, document, message: str) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InputError, match=message) as info:
        read_task_states(path)
    assert str(path) in str(info.value)


def test_unreadable_json_task_file(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_task_states(path)
