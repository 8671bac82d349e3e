"""Issue 24, item 12: a run holds a lock on its records (a second run says who holds it and exits 2;
a stale lock of a dead local process is taken over), and a resumed run checks that a completed
stage's outputs still exist before skipping it, rerunning it otherwise."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_reliability_signals import ENV, TESTS, _events, _start, _wait_for_starts


def test_a_second_run_on_the_same_records_exits_2_naming_the_holder(tmp_path):
    log = tmp_path / "slow.log"
    first = _start(tmp_path, workers=2, seconds=60, tasks=2, grace=1)
    _wait_for_starts(log, 2, first)
    second = subprocess.run([sys.executable, str(TESTS / "reliability_driver.py"), str(tmp_path), "2", "60", "2", "1"],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr, second.stderr
    assert "started" in second.stderr and "run.lock" in second.stderr
    assert first.poll() is None
    starts, done = _events(log)
    # The second run released none of the first's leases: nothing was started twice.
    assert starts == {"t0": 1, "t1": 1} and not done, starts
    first.terminate()
    first.communicate(timeout=60)


def test_a_stale_lock_of_a_dead_local_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "record").mkdir()
    (tmp_path / "record" / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                              "started": "earlier"}))
    done = subprocess.run([sys.executable, str(TESTS / "reliability_driver.py"), str(tmp_path), "1", "0", "1", "30"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "record" / "run.lock").exists()


def test_a_lock_held_on_another_host_is_not_taken_over(tmp_path):
    from exaconnect.services.run_lock import RunLock, RunLocked

    (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere-node-7", "pid": 1, "started": "then"}))
    with pytest.raises(RunLocked, match="host elsewhere-node-7, pid 1, started then"):
        RunLock(tmp_path).acquire()


# ---------------------------------------------------------------- outputs checked before a skip

def _ingest_stage(tmp_path):
    from exaconnect.services.ingest import IngestOptions, IngestStage

    image = np.random.default_rng(1).integers(0, 255, (20, 37, 45)).astype(np.uint8)
    np.save(tmp_path / "image.npy", image)
    options = IngestOptions(voxel_offset=(3, 11, 6), chunk_size=(16, 16, 16), overwrite=True)
    return IngestStage(src=str(tmp_path / "image.npy"), dest=str(tmp_path / "image"), options=options,
                       name="ingest.image"), image


def _run(tmp_path, stage):
    from exaconnect.services.runner import RunnerOptions, run_stages

    return run_stages([stage], RunnerOptions(str(tmp_path / "queues"), str(tmp_path / "record"), workers=1,
                                             progress=False))


def _read(layer: Path):
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box

    vol = open_layer(str(layer))
    return read_box(vol, layer_bounds(vol))


@pytest.mark.parametrize("damage", ["chunk", "info", "layer"])
def test_a_completed_stage_whose_output_was_deleted_runs_again(tmp_path, damage):
    import shutil

    stage, image = _ingest_stage(tmp_path)
    assert _run(tmp_path, stage).results["ingest.image"].status == "done"
    assert _run(tmp_path, stage).results["ingest.image"].status == "skipped"
    layer = tmp_path / "image"
    info = json.loads((layer / "info").read_text())
    if damage == "chunk":
        chunks = sorted((layer / info["scales"][0]["key"]).iterdir())
        assert len(chunks) == 3 * 3 * 2
        chunks[4].unlink()
    elif damage == "info":
        (layer / "info").unlink()
    else:
        shutil.rmtree(layer)
    assert _run(tmp_path, stage).results["ingest.image"].status == "done"
    assert np.array_equal(_read(layer), image)
    assert _run(tmp_path, stage).results["ingest.image"].status == "skipped"
