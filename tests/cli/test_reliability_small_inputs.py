"""Issue 24, item 13: the smaller bad inputs. Each is one line naming the option or path and what
was expected, exit 2, and nothing written: a queue root that is a file, negative sizes written
as `-8,8,8`, an unknown `--task-module`, negative thresholds and delays, `layer verify --bbox`
outside the layer, errors of a run without `--queue` that name its (kept) temporary folder,
`queue status` telling a task waiting out its retry delay from a leased one, a request with
two Host headers, and failed stages that would leave an empty mip or an empty layer behind (taken
back, and put back by a requeue)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest


from conftest import one_line as _one_line  # noqa: E402
from conftest import run_cli as _cli  # noqa: E402


@pytest.fixture
def volume(tmp_path) -> Path:
    path = tmp_path / "image.npy"
    np.save(path, np.random.default_rng(0).integers(0, 255, (12, 30, 26)).astype(np.uint8))
    return path


def test_a_queue_root_that_is_a_file_is_named(tmp_path, volume, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    for root in (blocker, blocker / "below"):
        code, _, err = _cli(["ingest", "run", volume, tmp_path / "layer", "--resolution", "8,8,8", "--queue", root], capsys)
        assert code == 2 and "is a file; expected a folder" in _one_line(err) and str(blocker) in err
    assert not (tmp_path / "layer").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--resolution", "-8,8,8", "--resolution: '-8,8,8' must be three finite positive numbers"),
    ("--chunk-size", "-32,32,32", "--chunk-size: '-32,32,32' must be positive"),
    ("--voxel-offset", "-5,-7,3", None),  # negative offsets are allowed: the value must reach the option
])
def test_negative_triples_reach_their_option(tmp_path, volume, capsys, option, value, message):
    argv = ["ingest", "run", volume, tmp_path / "layer", "--resolution", "8,8,8", option, value]
    if option == "--resolution":
        argv = ["ingest", "run", volume, tmp_path / "layer", option, value]
    code, _, err = _cli(argv, capsys)
    if message is None:
        assert code == 0, err
        info = json.loads((tmp_path / "layer" / "info").read_text())
        assert info["scales"][0]["voxel_offset"] == [-5, -7, 3]
    else:
        assert code == 2 and message in _one_line(err)
        assert not (tmp_path / "layer").exists()


def test_an_unknown_task_module_is_named(tmp_path, capsys):
    from exaconnect.services.queue import open_queue

    queue = tmp_path / "q"
    open_queue(str(queue))
    code, _, err = _cli(["queue", "work", queue, "--task-module", "no_such_lab_module", "--exit-when-empty"], capsys)
    assert code == 2 and "--task-module no_such_lab_module: no module of that name" in _one_line(err)


@pytest.mark.parametrize("argv,option", [
    (["queue", "work", "Q", "--retry-delay-seconds", "-5", "--exit-when-empty"], "--retry-delay-seconds"),
    (["queue", "work", "Q", "--max-attempts", "0", "--exit-when-empty"], "--max-attempts"),
    (["skeleton", "run", "LAYER", "--dust-threshold", "-5"], "--dust-threshold"),
    (["mesh", "run", "LAYER", "--simplification-error", "nan"], "--simplification-error"),
])
def test_negative_thresholds_and_delays_are_refused(tmp_path, capsys, argv, option):
    argv = [str(tmp_path / a) if a in ("Q", "LAYER") else a for a in argv]
    code, _, err = _cli(argv, capsys)
    assert code == 2 and f"argument {option}" in _one_line(err) and "expected a number >=" in err


def test_verify_with_a_box_outside_the_layer_is_an_error_not_ok(tmp_path, volume, capsys):
    layer = tmp_path / "layer"
    assert _cli(["ingest", "run", volume, layer, "--resolution", "8,8,8", "--voxel-offset", "3,5,7",
                 "--chunk-size", "16,16,16"], capsys)[0] == 0
    code, out, err = _cli(["layer", "verify", layer, "--bbox", "500,500,500,520,520,520"], capsys)
    assert code == 2 and out == "" and "outside layer" in _one_line(err) and "500,500,500" in err
    code, out, _ = _cli(["layer", "verify", layer, "--bbox", "20,20,10,40,40,30"], capsys)  # overlaps a corner
    assert code == 0 and json.loads(out)["mips"][0]["chunks"] > 0


def test_a_failed_run_without_a_queue_keeps_the_folder_its_error_names(tmp_path, volume, capsys):
    """The dead-letter path in the message must exist after the command has returned."""
    import re

    layer, big = tmp_path / "layer", tmp_path / "big.npy"
    np.save(big, np.random.default_rng(1).integers(0, 255, (32, 48, 48)).astype(np.uint8))
    assert _cli(["ingest", "run", big, layer, "--resolution", "8,8,8", "--chunk-size", "16,16,16"], capsys)[0] == 0
    key = json.loads((layer / "info").read_text())["scales"][0]["key"]
    chunk = sorted(p for p in (layer / key).iterdir() if not p.name.startswith("."))[0]
    chunk.write_bytes(chunk.read_bytes()[:50])
    code, _, err = _cli(["downsample", "run", layer, "--num-mips", "1"], capsys)
    assert code == 2, err
    kept = re.search(r"kept in (\S+?);", err)
    assert kept and Path(kept.group(1)).is_dir()
    named = re.search(r"see (\S+dead-letter)\)", err)
    assert named and Path(named.group(1)).is_dir() and any(Path(named.group(1)).iterdir())


def test_queue_status_tells_a_task_waiting_out_its_retry_delay_from_a_leased_one(tmp_path):
    from exaconnect.services.file_queue import FileQueue
    from exaconnect.services.queue import FailureLedger, queue_status

    queue = FileQueue(str(tmp_path / "q"), create=True)
    queue.insert([{"n": i} for i in range(3)])
    spec = str(tmp_path / "q")
    ledger = FailureLedger.for_queue(spec)
    held = queue.lease(600)  # a worker holds this one
    failed = queue.lease(600)  # this one failed and waits 300 s before its next lease
    ledger.record_failure(failed.task_id, None, "boom", attempt=1, retry_delay=300)
    queue.release(failed, 300)
    status = queue_status(spec)
    assert (status.enqueued, status.leased, status.waiting, status.retrying) == (3, 1, 1, 1), status
    # Once leased again (after its delay) it counts as leased.
    ledger.record_failure(held.task_id, None, "boom", attempt=1, retry_delay=0)
    queue.release(held, 0)
    time.sleep(1.1)
    again = queue.lease(600)
    assert again is not None
    status = queue_status(spec)
    assert status.leased == 1 and status.waiting == 1


def test_a_request_with_two_host_headers_is_refused(tmp_path, volume, capsys):
    import socket

    from exaconnect.viewer.server import ViewerServer

    layer = tmp_path / "layer"
    assert _cli(["ingest", "run", volume, layer, "--resolution", "8,8,8"], capsys)[0] == 0
    with ViewerServer([str(layer)], request_timeout_s=5.0) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"GET /data/layer/info HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nHost: evil.example\r\n"
                         "Connection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"more than one Host header" in answer


def _damaged_downsample(tmp_path, capsys, queue: Path) -> tuple[Path, dict[Path, bytes]]:
    """A layer off the origin whose mip-0 chunks are all truncated, and a downsample over it that
    failed (every mip-1 task dead-lettered). Returns the layer and the chunks' good bytes."""
    layer, source = tmp_path / "layer", tmp_path / "small.npy"
    np.save(source, np.random.default_rng(2).integers(0, 255, (16, 64, 64)).astype(np.uint8))
    assert _cli(["ingest", "run", source, layer, "--resolution", "8,8,8", "--chunk-size", "32,32,16",
                 "--voxel-offset", "3,5,7"], capsys)[0] == 0
    key = json.loads((layer / "info").read_text())["scales"][0]["key"]
    good = {p: p.read_bytes() for p in (layer / key).iterdir() if not p.name.startswith(".")}
    for chunk, data in good.items():
        chunk.write_bytes(data[:40])
    code, _, err = _cli(["downsample", "run", layer, "--num-mips", "1", "--factor", "2,2,1", "--queue", queue], capsys)
    assert code == 2 and "dead-lettered" in err and "no longer lists the mips that got no chunk" in err, err
    return layer, good


def test_a_failed_downsample_leaves_no_empty_mip_in_the_info(tmp_path, capsys):
    """Every task of mip 1 fails (its input chunks are damaged): the info must not go on listing
    a mip 1 that holds nothing, and a rerun that resumes the failed stage fails the same way."""
    layer, _ = _damaged_downsample(tmp_path, capsys, tmp_path / "queue")
    assert len(json.loads((layer / "info").read_text())["scales"]) == 1
    code, _, err = _cli(["downsample", "run", layer, "--num-mips", "1", "--factor", "2,2,1",
                         "--queue", tmp_path / "queue"], capsys)
    assert code == 2 and "dead-lettered" in err, err
    assert len(json.loads((layer / "info").read_text())["scales"]) == 1


def test_a_requeue_puts_back_the_mip_its_tasks_were_made_for(tmp_path, capsys):
    """Damage repaired, `queue dead-letters requeue` restores the scale the clean-up took back,
    and the resumed run writes the mip an undisturbed downsample writes."""
    queue = tmp_path / "queue"
    layer, good = _damaged_downsample(tmp_path, capsys, queue)
    for chunk, data in good.items():
        chunk.write_bytes(data)
    [service_queue] = {p.parent.parent for p in queue.glob("*/dead-letter/*.json")}
    assert _cli(["queue", "dead-letters", "requeue", service_queue, "--all"], capsys)[0] == 0
    assert len(json.loads((layer / "info").read_text())["scales"]) == 2
    assert _cli(["downsample", "run", layer, "--num-mips", "1", "--factor", "2,2,1", "--queue", queue], capsys)[0] == 0

    undisturbed = tmp_path / "undisturbed"
    assert _cli(["ingest", "run", tmp_path / "small.npy", undisturbed, "--resolution", "8,8,8",
                 "--chunk-size", "32,32,16", "--voxel-offset", "3,5,7"], capsys)[0] == 0
    assert _cli(["downsample", "run", undisturbed, "--num-mips", "1", "--factor", "2,2,1"], capsys)[0] == 0
    from exaconnect.precomputed.layers import open_layer

    for mip in (0, 1):
        assert np.array_equal(open_layer(str(layer), mip=mip)[:, :, :], open_layer(str(undisturbed), mip=mip)[:, :, :])
    assert json.loads((layer / "info").read_text())["scales"] == json.loads((undisturbed / "info").read_text())["scales"]


def test_a_restore_leaves_a_layer_rewritten_since_the_clean_up_alone(tmp_path):
    from exaconnect.precomputed.empty_outputs import TakenBack, restore

    (tmp_path / "info").write_text("rewritten")
    taken = TakenBack(f"file://{tmp_path}", "a test", {"info": ("before", "after")})
    assert not restore(taken) and (tmp_path / "info").read_text() == "rewritten"
    (tmp_path / "info").write_text("after")
    assert restore(TakenBack.from_dict(taken.to_dict())) and (tmp_path / "info").read_text() == "before"


def test_an_ingest_that_wrote_no_chunk_leaves_no_empty_layer(tmp_path, capsys):
    """Every slab's read fails (a PNG whose pixels do not decode passes the header pre-check): the
    layer must not be left as an info over nothing."""
    import struct
    import zlib

    import imageio.v3 as iio

    folder = tmp_path / "secs"
    folder.mkdir()
    for z in range(3):
        iio.imwrite(folder / f"s{z:03d}.png", np.random.default_rng(z).integers(0, 255, (29, 37)).astype(np.uint8))
    for path in folder.iterdir():
        data = bytearray(path.read_bytes())
        at = data.index(b"IDAT")
        length = struct.unpack(">I", data[at - 4: at])[0]
        data[at + 4: at + 4 + length] = bytes(length)
        data[at + 4 + length: at + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[at: at + 4 + length])))
        path.write_bytes(bytes(data))
    code, _, err = _cli(["ingest", "run", folder, tmp_path / "layer", "--resolution", "8,8,8"], capsys)
    assert code == 2 and "s000.png" in err and "got no chunk and its info was removed" in err, err
    assert not (tmp_path / "layer" / "info").exists()


def test_a_resumed_run_releases_dead_workers_leases_but_not_retry_delays(tmp_path):
    """The runner gives back the leases of its earlier run's dead workers at once, with their
    attempts refunded; a failed task waiting out its retry delay keeps its delay and its attempts."""
    from exaconnect.services.file_queue import FileQueue
    from exaconnect.services.queue import FailureLedger
    from exaconnect.services.runner import _release_local_leases

    spec = str(tmp_path / "q")
    queue = FileQueue(spec, create=True)
    queue.insert([{"n": i} for i in range(2)])
    held, failed = queue.lease(600), queue.lease(600)
    FailureLedger.for_queue(spec).record_failure(failed.task_id, None, "boom", attempt=1, retry_delay=300)
    queue.release(failed, 300)
    _release_local_leases(spec)
    now = time.time()
    entries = {ident: (ts, attempts) for _, ts, ident, attempts in queue.entries()}
    assert entries[held.task_id] == (0, 0) or (entries[held.task_id][0] <= now and entries[held.task_id][1] == 0)
    assert entries[failed.task_id][0] > now + 200 and entries[failed.task_id][1] == 1
