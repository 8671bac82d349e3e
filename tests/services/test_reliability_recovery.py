"""Issue 24, item 3: recovery never fakes completion. Dead-lettered igneous tasks (list payloads)
can be requeued; a stage is recorded done only when its queue accounts for every task it was
given as completed, so a purge of the dead letters (or of the queue) makes a rerun redo the
stage instead of recording it done with its output missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exaconnect.services.ingest import IngestOptions, ingest_now


def _image_layer(tmp_path) -> Path:
    """52x44x24 uint8 off the origin in 16^3 chunks: not a multiple of the chunk size."""
    image = np.random.default_rng(3).integers(0, 255, (24, 44, 52)).astype(np.uint8)
    np.save(tmp_path / "image.npy", image)
    ingest_now(str(tmp_path / "image.npy"), str(tmp_path / "image"),
               IngestOptions(voxel_offset=(5, 9, 3), chunk_size=(16, 16, 16)), progress=False)
    return tmp_path / "image"


def _mip_chunks(layer: Path, mip: int) -> list[Path]:
    info = json.loads((layer / "info").read_text())
    if len(info["scales"]) <= mip:
        return []
    folder = layer / info["scales"][mip]["key"]
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _stage(layer: Path):
    from exaconnect.services.downsample import DownsampleStage

    return DownsampleStage(layer=str(layer), num_mips=1, factor=(2, 2, 1))


def _options(tmp_path):
    from exaconnect.services.runner import RunnerOptions

    return RunnerOptions(queue_root=str(tmp_path / "queues"), record=str(tmp_path / "record"), workers=1,
                         progress=False, max_attempts=1)


def _fail_once(tmp_path, layer: Path):
    """Run the stage with one mip-0 chunk truncated: its task is dead-lettered, the stage fails.
    Returns (the truncated chunk, its good bytes, the downsample queue)."""
    from exaconnect.services.runner import StageFailed, run_stages, service_queue

    chunk = _mip_chunks(layer, 0)[0]
    good = chunk.read_bytes()
    chunk.write_bytes(good[:100])
    with pytest.raises(StageFailed, match="dead-lettered"):
        run_stages([_stage(layer)], _options(tmp_path))
    return chunk, good, service_queue(str(tmp_path / "queues"), "downsample")


def _expected_mip1_chunks(layer: Path) -> int:
    info = json.loads((layer / "info").read_text())
    scale = info["scales"][1]
    grid = [-(-s // c) for s, c in zip(scale["size"], scale["chunk_sizes"][0])]
    return int(np.prod(grid))


def test_a_dead_lettered_downsample_task_can_be_requeued_and_the_rerun_finishes(tmp_path, capsys):
    from exaconnect.cli import main
    from exaconnect.services.queue import FailureLedger
    from exaconnect.services.runner import run_stages

    layer = _image_layer(tmp_path)
    chunk, good, queue = _fail_once(tmp_path, layer)
    [record] = FailureLedger.for_queue(queue).dead_records()
    assert isinstance(record["payload"], list)  # igneous's DownsampleTask: a function-task payload
    chunk.write_bytes(good)
    assert main(["queue", "dead-letters", "requeue", queue, "--all"]) == 0, capsys.readouterr().err
    report = run_stages([_stage(layer)], _options(tmp_path))
    assert report.results["downsample.pyramid"].status == "done"
    assert len(_mip_chunks(layer, 1)) == _expected_mip1_chunks(layer) > 0


def test_requeue_refuses_only_payloads_that_are_not_tasks(tmp_path):
    from exaconnect.errors import QueueError
    from exaconnect.services.queue import FailureLedger, open_queue, requeue_dead_letters

    queue = str(tmp_path / "q")
    open_queue(queue)
    FailureLedger.for_queue(queue).bury("abc", "this is not json", "cannot rebuild", 1)
    with pytest.raises(QueueError, match="abc"):
        requeue_dead_letters(queue)


@pytest.mark.parametrize("purge", ["dead_letters", "whole_queue"])
def test_a_rerun_after_a_purge_redoes_the_stage_instead_of_recording_it_done(tmp_path, purge):
    from exaconnect.services.queue import purge_dead_letters, purge_queue
    from exaconnect.services.runner import StageFailed, run_stages

    layer = _image_layer(tmp_path)
    chunk, good, queue = _fail_once(tmp_path, layer)
    if purge == "dead_letters":
        purge_dead_letters(queue)
    else:
        purge_queue(queue, dead_letters=True)
    # The input is still damaged: the rerun must fail again, not record the stage done.
    with pytest.raises(StageFailed):
        run_stages([_stage(layer)], _options(tmp_path))
    assert not (tmp_path / "record" / "stages" / "downsample.pyramid.json").exists()
    chunk.write_bytes(good)
    purge_dead_letters(queue)
    report = run_stages([_stage(layer)], _options(tmp_path))
    assert report.results["downsample.pyramid"].status == "done"
    assert len(_mip_chunks(layer, 1)) == _expected_mip1_chunks(layer) > 0


def test_a_stage_is_not_recorded_done_when_its_queue_lost_tasks(tmp_path):
    """Tasks that vanish from the queue without being completed (deleted by hand, a purge while
    workers run) leave the completion count short: the stage fails naming the shortfall."""
    from exaconnect.services.queue import open_queue
    from exaconnect.services.runner import StageFailed, run_stages, service_queue
    from exaconnect.services.worker import Worker

    layer = _image_layer(tmp_path)
    options = _options(tmp_path)
    queue = service_queue(options.queue_root, "downsample")

    real_run = Worker.run

    def delete_every_task_first(self):
        q = open_queue(self.queue_spec)
        for shard, ts, ident, attempts in list(q.entries()):
            q.delete_id(ident)
        return real_run(self)

    Worker.run = delete_every_task_first
    try:
        with pytest.raises(StageFailed, match="completed 0 of"):
            run_stages([_stage(layer)], options)
    finally:
        Worker.run = real_run
    assert not (tmp_path / "record" / "stages" / "downsample.pyramid.json").exists()


def test_a_completion_tallied_just_after_its_task_file_went_is_not_taken_for_a_lost_task(tmp_path):
    """Workers delete a finished task's file, then tally it: a runner checking in between (seen
    under load on the PBS demo) must wait for the tally instead of failing the stage."""
    import threading
    import time

    from exaconnect.services.file_queue import FileQueue
    from exaconnect.services.runner import _check_all_completed

    spec = str(tmp_path / "q")
    queue = FileQueue(spec, create=True)
    queue.insert([{"n": 1}])
    lease = queue.lease(60)
    import os

    os.unlink(os.path.join(queue._shard_dirs[lease.shard], lease.name))  # the worker's first step

    def tally_late():
        time.sleep(1.0)
        with open(queue.path / "completions" / f"{lease.shard:03d}", "ab") as f:
            f.write(b"\0")

    writer = threading.Thread(target=tally_late)
    writer.start()
    started = time.monotonic()
    _check_all_completed(_stage(tmp_path / "layer"), spec, 1)
    writer.join()
    assert 0.8 < time.monotonic() - started < 5
