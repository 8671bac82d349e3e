"""The stage runner: dependency order, skipping finished stages, resuming an interrupted one,
and a run SIGKILLed in the middle of segmentation that finishes without redoing finished tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.services.runner import RunnerOptions, StageFailed, run_stages
from exaconnect.services.stages import stage_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner_tasks import RaiseTask, lines_stage, task_stage  # noqa: E402


def test_stages_are_ordered_by_their_requirements_which_join_the_run_by_themselves():
    a = task_stage("a")
    b = task_stage("b", "segment", after=(a,))
    c = task_stage("c", "mesh", after=(b,))
    # Requirements are objects: listing only the last stage brings in the ones it needs.
    assert [s.name for s in stage_graph([c])] == ["a", "b", "c"]
    assert [s.name for s in stage_graph([c, a, b])] == ["a", "b", "c"]
    with pytest.raises(InputError, match="declared twice"):
        stage_graph([task_stage("a"), task_stage("a", "mesh")])
    with pytest.raises(InputError, match="expected a stage object"):
        stage_graph([task_stage("a", after=("b",))])


def test_a_stage_class_without_a_service_or_with_a_bad_name_is_refused():
    from exaconnect.services.stages import Stage

    with pytest.raises(InputError, match="names no service"):
        Stage()
    with pytest.raises(InputError, match="stage name"):
        task_stage("has space")


def test_a_second_run_skips_finished_stages_and_a_change_reruns_what_depends_on_it(tmp_path):
    log = tmp_path / "log.txt"
    options = RunnerOptions(str(tmp_path / "q"), str(tmp_path / "records"), workers=1, progress=False)
    a = lines_stage("a", log, lines=("1", "2"))
    stages = [a, lines_stage("b", log, after=(a,)), lines_stage("c", log)]
    first = run_stages(stages, options)
    assert [r.status for r in first.results.values()] == ["done", "done", "done"]
    assert sorted(log.read_text().split()) == ["a:1", "a:2", "b:x", "c:x"]
    second = run_stages(stages, options)
    assert {r.status for r in second.results.values()} == {"skipped"}
    assert len(log.read_text().split()) == 4  # nothing ran again
    a2 = lines_stage("a", log, lines=("1", "2"), threshold=2)
    changed = [a2, lines_stage("b", log, after=(a2,)), lines_stage("c", log)]
    third = run_stages(changed, options)
    assert {n: r.status for n, r in third.results.items()} == {"a": "done", "b": "done", "c": "skipped"}


def test_dead_letters_fail_the_stage_and_nothing_below_it_runs(tmp_path):
    log = tmp_path / "log.txt"
    bad = task_stage("bad", make=lambda: [RaiseTask("boom")])
    stages = [bad, lines_stage("after", log, after=(bad,))]
    options = RunnerOptions(str(tmp_path / "q"), str(tmp_path / "records"), workers=1, progress=False, max_attempts=1)
    with pytest.raises(StageFailed, match="bad: 1 tasks dead-lettered"):
        run_stages(stages, options)
    assert not log.exists()


def test_an_enqueued_stage_resumes_from_its_queue_without_enqueuing_again(tmp_path):
    """A runner killed after enqueueing: the next one drains what is left, it does not enqueue
    the batch again (which would redo finished tasks)."""
    from exaconnect.services.queue import open_queue
    from exaconnect.services.runner import service_queue

    log = tmp_path / "log.txt"
    stage = lines_stage("a", log, lines=("1", "2", "3"))
    options = RunnerOptions(str(tmp_path / "q"), str(tmp_path / "records"), workers=1, progress=False)
    from exaconnect.precomputed.store import ArtifactStore
    from exaconnect.services.queue import enqueue

    queue = service_queue(options.queue_root, "ingest")
    tasks = list(stage.make_tasks())
    enqueue(queue, tasks[1:])  # as if task 1 had finished before the kill: its completion is recorded
    from exaconnect.services.queue import open_queue as _open

    (_open(queue).path / "completions" / "000").write_bytes(b"\0")
    from exaconnect.services.stages import fingerprint

    ArtifactStore(options.record).put_json("stages/a.enqueued.json", {"fingerprint": fingerprint(stage), "tasks": 3})
    report = run_stages([stage], options)
    assert report.results["a"].tasks == 3
    assert sorted(log.read_text().split()) == ["a:2", "a:3"]
    assert open_queue(queue).enqueued == 0


@pytest.fixture(scope="module")
def segment_sample(tmp_path_factory):
    from conftest import make_tiny_ffn

    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, write_box
    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

    root = tmp_path_factory.mktemp("runner")
    image, _ = synthetic_volume(SyntheticSpec(shape=(40, 56, 48), neurites=10, seed=4))
    size = (48, 56, 40)
    # Off the origin: the layer starts at (5, 3, 7).
    vol = create_layer(str(root / "image"), LayerSpec("image", "uint8", size, (8.0, 8.0, 8.0), voxel_offset=(5, 3, 7),
                                                      chunk_size=(8, 8, 8)), Provenance("test"))
    write_box(vol, Box((5, 3, 7), (53, 59, 47)), image)
    return root, make_tiny_ffn(root / "tiny_ffn")


def test_a_run_killed_during_segmentation_resumes_without_redoing_finished_tasks(segment_sample):
    root, model = segment_sample
    out, queue = root / "seg", root / "queue"
    command = [sys.executable, "-m", "exaconnect.cli", "segment", "run", str(root / "image"), str(out), "--model", model,
               "--subvolume", "16,16,16", "--overlap", "4,4,4", "--queue", str(queue), "--workers", "1", "--num-mips", "1"]
    labels = out.parent / "seg.staging" / "labels" / "initial"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = list(labels.glob("*.npz.done")) if labels.exists() else []
        if len(done) >= 5 or process.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in labels.glob("*.npz")}
    assert 5 <= len(finished) < 36, "the kill must land in the middle of the FFN stage (36 subvolumes)"

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "segment.initial: resuming" in again.stdout
    # Files finished before the kill were not written again; every other cell was.
    after = {p: p.stat().st_mtime_ns for p in labels.glob("*.npz")}
    assert len(after) == 36
    assert all(after[p] == t for p, t in finished.items())
    report = json.loads(again.stdout.strip().splitlines()[-1])
    assert report["segment.relabel"]["status"] == "done"
    # The result equals an undisturbed run's.
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box

    clean = subprocess.run([*command[:6], str(root / "clean"), *command[7:-6], "--queue", str(root / "queue2"),
                            "--workers", "1", "--num-mips", "1"], capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    a, b = open_layer(str(out)), open_layer(str(root / "clean"))
    assert np.array_equal(read_box(a, layer_bounds(a)), read_box(b, layer_bounds(b)))
