"""Corrupt or missing input is never silent (issue 13, items 6, 7 and 9).

Damaged chunks (truncated, random bytes) fail by name before a decoder sees them; missing
chunks stop a stage before it starts unless allowed; `verify` finds both and checksum drift;
tasks carry absolute paths; a stage's provenance record survives igneous's own.
Layers here are off the origin and not a multiple of their chunk size.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from exaconnect.errors import LayerError
from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box
from exaconnect.services.ingest import IngestOptions, create_ingest_tasks, ingest_now

OFFSET = (3, 5, 7)
CHUNK = (16, 16, 16)  # small enough for igneous to build a pyramid of this 70 x 60 x 50 layer


def _labels(seed: int = 0) -> np.ndarray:
    """[z, y, x] = 50 x 60 x 70 blocky labels: 1..5 in 10-voxel cubes (plus zeros)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 6, (5, 6, 7)).repeat(10, 0).repeat(10, 1).repeat(10, 2)).astype(np.uint32) * 7


@pytest.fixture()
def seg_layer(tmp_path) -> tuple[Path, np.ndarray]:
    labels = _labels()
    np.save(tmp_path / "labels.npy", labels)
    ingest_now(str(tmp_path / "labels.npy"), str(tmp_path / "seg"),
               IngestOptions("segmentation", resolution=(8, 8, 40), voxel_offset=OFFSET, chunk_size=CHUNK), progress=False)
    return tmp_path / "seg", labels


def _chunks(layer: Path) -> list[Path]:
    info = json.loads((layer / "info").read_text())
    return sorted((layer / info["scales"][0]["key"]).iterdir())


def _execute(task) -> None:
    """igneous's task creation yields task objects, or partials of its function tasks (which
    run when called)."""
    made = task() if isinstance(task, functools.partial) else task
    if made is not None:
        made.execute()


def _read_all(layer: Path) -> np.ndarray:
    vol = open_layer(str(layer))
    return read_box(vol, layer_bounds(vol))


# ---------------------------------------------------------------- damaged chunks

def test_truncated_compressed_segmentation_chunk_fails_naming_the_file(seg_layer):
    layer, labels = seg_layer
    np.testing.assert_array_equal(_read_all(layer), labels)
    victim = _chunks(layer)[4]
    data = victim.read_bytes()
    victim.write_bytes(data[:-8])  # two words short: the decoder would read past the end
    with pytest.raises(LayerError, match=victim.name):
        _read_all(layer)
    victim.write_bytes(data[:-3])  # not even whole words
    with pytest.raises(LayerError, match="damaged"):
        _read_all(layer)


def test_random_bytes_in_a_chunk_raise_instead_of_crashing_the_process(seg_layer, tmp_path):
    # Before the check, cseg.decompress segfaulted on these bytes, so the read runs in a child.
    layer, _ = seg_layer
    victim = _chunks(layer)[2]
    victim.write_bytes(np.random.default_rng(5).integers(0, 256, victim.stat().st_size).astype(np.uint8).tobytes())
    script = textwrap.dedent(f"""
        from exaconnect.errors import LayerError
        from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box
        vol = open_layer({str(layer)!r})
        try:
            read_box(vol, layer_bounds(vol))
        except LayerError as exc:
            print("LayerError:", exc)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the code under test
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, f"reader died with {done.returncode}: {done.stderr[-500:]}"
    assert "LayerError:" in done.stdout and victim.name in done.stdout


def test_igneous_tasks_read_through_the_check(seg_layer):
    """Meshing (igneous's MeshTask) on a truncated chunk fails by name instead of meshing wrong labels."""
    from exaconnect.services.mesh import create_mesh_forge_tasks

    layer, _ = seg_layer
    tasks = create_mesh_forge_tasks(str(layer), shape=(256, 256, 256))
    victim = _chunks(layer)[7]
    victim.write_bytes(victim.read_bytes()[:-12])
    with pytest.raises(LayerError, match=victim.name):
        for task in tasks:
            _execute(task)


# ---------------------------------------------------------------- missing chunks

@pytest.mark.parametrize("stage", ["mesh", "skeletonize", "downsample"])
def test_a_stage_refuses_an_input_with_holes_unless_allowed(seg_layer, stage):
    from exaconnect.services.downsample import create_downsample_tasks
    from exaconnect.services.mesh import create_mesh_forge_tasks
    from exaconnect.services.skeleton import create_skeleton_forge_tasks

    create = {"mesh": create_mesh_forge_tasks, "skeletonize": create_skeleton_forge_tasks,
              "downsample": create_downsample_tasks}[stage]
    layer, _ = seg_layer
    info_before = (layer / "info").read_text()
    victim = _chunks(layer)[5]
    victim.unlink()  # e.g. a dead-lettered ingest slab
    with pytest.raises(LayerError, match=f"{stage}: .*missing 1 chunk.*{victim.name}"):
        create(str(layer))
    assert (layer / "info").read_text() == info_before  # refused before igneous touched the info
    assert len(list(create(str(layer), allow_missing=True))) >= 1


def test_reads_of_our_layers_do_not_fill_missing_chunks(seg_layer):
    layer, _ = seg_layer
    victim = _chunks(layer)[0]
    victim.unlink()
    with pytest.raises(LayerError, match=victim.name):
        _read_all(layer)


def test_downsample_tasks_do_not_fill_missing_chunks(seg_layer):
    from exaconnect.services.downsample import create_downsample_tasks

    layer, _ = seg_layer
    tasks = create_downsample_tasks(str(layer), num_mips=1, factor=(2, 2, 1))
    assert all(not (t.keywords if isinstance(t, functools.partial) else t.__dict__).get("fill_missing", True)
               for t in tasks)
    _chunks(layer)[1].unlink()  # lost after the stage was checked and enqueued
    with pytest.raises(LayerError, match="missing"):
        for task in tasks:
            _execute(task)


# ---------------------------------------------------------------- verify

def test_verify_reports_missing_damaged_and_changed_chunks(seg_layer):
    from exaconnect.precomputed.verify import verify_layer

    layer, _ = seg_layer
    clean = verify_layer(str(layer))
    assert clean["ok"] and clean["mips"][0]["chunks"] == len(_chunks(layer)) == 5 * 4 * 4
    assert clean["mips"][0]["checked_against_manifest"] == 80  # ingest recorded every chunk
    files = _chunks(layer)
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:-4])
    files[2].write_bytes(b"\x00" * 16)
    # a swap of two valid chunks of the same shape parses fine; only the checksum catches it
    a, b = files[3].read_bytes(), files[4].read_bytes()
    files[3].write_bytes(b)
    report = verify_layer(str(layer))
    mip0 = report["mips"][0]
    assert not report["ok"]
    assert mip0["missing"] == [f"{files[0].parent.name}/{files[0].name}"]
    damaged = {d["chunk"].split("/")[-1]: d["problem"] for d in mip0["damaged"]}
    assert set(damaged) == {files[1].name, files[2].name} | ({files[3].name} if a != b else set())
    assert "checksum" in damaged.get(files[3].name, "checksum")
    # a box restricts the check to the chunks it touches (mip-0 voxels, off the chunk grid)
    sub = verify_layer(str(layer), bbox=Box((40, 40, 30), (60, 60, 40)))
    assert sub["ok"] and sub["mips"][0]["chunks"] == 2 * 2 * 2


def test_layer_verify_command_prints_json_and_exits_1_on_damage(seg_layer, capsys):
    import argparse

    from exaconnect.cli import layer as layer_cli

    parser = argparse.ArgumentParser()
    layer_cli.register(parser.add_subparsers(dest="command"))
    layer, _ = seg_layer
    args = parser.parse_args(["layer", "verify", str(layer), "--compact"])
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)["ok"]
    _chunks(layer)[3].unlink()
    args = parser.parse_args(["layer", "verify", str(layer), "--mip", "0", "--compact"])
    assert args.func(args) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["mips"][0]["missing"]) == 1
    args = parser.parse_args(["layer", "info", str(layer), "--compact"])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mips"][0]["voxel_offset"] == list(OFFSET) and info["provenance"]["processing"][0]["method"]["stage"] == "ingest"


# ---------------------------------------------------------------- self-contained payloads

def test_ingest_payload_is_absolute_and_runs_from_another_directory(tmp_path, monkeypatch):
    from taskqueue.registered_task import deserialize

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    labels = _labels(1)
    import h5py

    with h5py.File(work / "labels.h5", "w") as f:
        f["stack"] = labels
    monkeypatch.chdir(work)
    tasks = create_ingest_tasks("labels.h5:stack", "seg", IngestOptions("segmentation", voxel_offset=OFFSET,
                                                                       chunk_size=CHUNK))
    payloads = [t.payload() for t in tasks]
    assert all(p["src"] == f"{work}/labels.h5:stack" and p["dest"] == f"file://{work}/seg" for p in payloads)
    monkeypatch.chdir(elsewhere)
    for payload in payloads:
        deserialize(json.dumps(payload)).execute()
    np.testing.assert_array_equal(_read_all(work / "seg"), labels)


def test_ingest_through_a_worker_started_in_another_directory(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    labels = _labels(2)
    np.save(work / "labels.npy", labels)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        from exaconnect.services.queue import enqueue

        tasks = create_ingest_tasks("labels.npy", "seg", IngestOptions("segmentation", voxel_offset=OFFSET,
                                                                      chunk_size=CHUNK))
        enqueue(str(tmp_path / "queue"), tasks)
    finally:
        os.chdir(cwd)
    worker = [sys.executable, "-m", "exaconnect.cli", "queue", "work", str(tmp_path / "queue"), "--exit-when-empty",
              "--lease-seconds", "60"]
    done = subprocess.run(worker, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list((tmp_path / "queue").glob("dead-letter/*.json"))
    np.testing.assert_array_equal(_read_all(work / "seg"), labels)


# ---------------------------------------------------------------- provenance

@pytest.mark.parametrize("stage", ["mesh", "skeletonize", "downsample"])
def test_a_stage_provenance_record_survives_igneous_writing_the_same_file(seg_layer, stage):
    from exaconnect.services.downsample import create_downsample_tasks
    from exaconnect.services.mesh import create_mesh_forge_tasks
    from exaconnect.services.skeleton import create_skeleton_forge_tasks

    layer, _ = seg_layer
    create = {"mesh": create_mesh_forge_tasks, "skeletonize": create_skeleton_forge_tasks,
              "downsample": lambda url: create_downsample_tasks(url, num_mips=1, factor=(2, 2, 1))}[stage]
    list(create(str(layer)))  # what enqueue does: exhaust the tasks (igneous commits its record then)
    records = json.loads((layer / "provenance").read_text())["processing"]
    stages = [r["method"].get("stage") for r in records]
    igneous_tasks = [r["method"].get("task") for r in records if "task" in r["method"]]
    assert stages[0] == "ingest" and stage in stages, records
    assert igneous_tasks, "igneous's own record is kept too"


# ---------------------------------------------------------------- the chunk check itself (property tests)

from hypothesis import given, settings, strategies as st  # noqa: E402


@st.composite
def encoded_chunks(draw):
    import compressed_segmentation as cseg

    shape = tuple(draw(st.integers(1, 40)) for _ in range(3))
    block = tuple(draw(st.sampled_from([2, 4, 8])) for _ in range(3))
    dtype = draw(st.sampled_from([np.uint32, np.uint64]))
    distinct = draw(st.sampled_from([1, 2, 3, 5, 40, 5000]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    big = 2**40 if dtype == np.uint64 else 1
    labels = np.asfortranarray(rng.integers(0, distinct, shape).astype(dtype) * big)
    return labels, block, cseg.compress(labels, block_size=block, order="F")


@settings(max_examples=150, deadline=None)
@given(encoded_chunks(), st.data())
def test_chunk_check_accepts_every_encoding_and_rejects_every_truncation(chunk, data):
    import compressed_segmentation as cseg

    from exaconnect.precomputed.chunks import compressed_segmentation_problem

    labels, block, encoded = chunk
    assert compressed_segmentation_problem(encoded, labels.shape, labels.dtype, block) == ""
    decoded = cseg.decompress(encoded, labels.shape, labels.dtype, block, order="F")
    np.testing.assert_array_equal(decoded, labels)
    cut = data.draw(st.integers(1, len(encoded) - 1))
    assert compressed_segmentation_problem(encoded[:-cut], labels.shape, labels.dtype, block)
    assert compressed_segmentation_problem(encoded + b"\0\0\0\0", labels.shape, labels.dtype, block)


@settings(max_examples=150, deadline=None)
@given(encoded_chunks(), st.data())
def test_damaged_chunks_pass_to_the_decoder_only_when_every_read_is_in_bounds(chunk, data):
    """Random bytes, or a valid chunk with random words overwritten: the check either rejects
    it or the decoder (which would segfault on an out-of-bounds offset) runs without crashing."""
    import compressed_segmentation as cseg

    from exaconnect.precomputed.chunks import compressed_segmentation_problem

    labels, block, encoded = chunk
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    if data.draw(st.booleans()):
        damaged = rng.integers(0, 256, len(encoded)).astype(np.uint8).tobytes()
    else:
        words = np.frombuffer(encoded, "<u4").copy()
        at = rng.integers(0, len(words), data.draw(st.integers(1, 4)))
        words[at] = rng.integers(0, 2**32, len(at), dtype=np.uint64).astype(np.uint32)
        damaged = words.tobytes()
    if compressed_segmentation_problem(damaged, labels.shape, labels.dtype, block) == "":
        cseg.decompress(damaged, labels.shape, labels.dtype, block, order="F")  # must not crash
