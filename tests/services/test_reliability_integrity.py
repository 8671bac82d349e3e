"""Issue 24, item 4: corruption that still decodes is caught. Where a layer carries checksums
(manifests written with its chunks), every chunk a stage reads is checked against them (unless
switched off), and derived mips (downsample output) get checksums when written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exaconnect.services.ingest import IngestOptions, ingest_now

OFFSET = (5, 9, 3)


def _layer(tmp_path, kind: str) -> Path:
    """52x44x24 voxels off the origin in 16^3 chunks (not a multiple of it)."""
    rng = np.random.default_rng(4)
    if kind == "image":
        data = rng.integers(0, 255, (24, 44, 52)).astype(np.uint8)
        options = IngestOptions(voxel_offset=OFFSET, chunk_size=(16, 16, 16))
    else:
        data = (rng.integers(1, 6, (3, 5, 6)).repeat(8, 0).repeat(9, 1).repeat(9, 2)[:24, :44, :52]).astype(np.uint32)
        options = IngestOptions("segmentation", voxel_offset=OFFSET, chunk_size=(16, 16, 16))
    np.save(tmp_path / f"{kind}.npy", data)
    ingest_now(str(tmp_path / f"{kind}.npy"), str(tmp_path / kind), options, progress=False)
    return tmp_path / kind


def _chunks(layer: Path, mip: int = 0) -> list[Path]:
    info = json.loads((layer / "info").read_text())
    return sorted((layer / info["scales"][mip]["key"]).iterdir())


def _same_length_garbage(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = np.random.default_rng(9).integers(0, 255, 64).astype(np.uint8).tobytes()
    chunk.write_bytes(bytes(data))


def _flip_a_packed_value_byte(chunk: Path) -> None:
    """One byte of a compressed_segmentation chunk's packed values: still structurally sound."""
    words = np.frombuffer(chunk.read_bytes(), dtype="<u4").copy()
    header = words[1:3]  # channel offset word, then block 0's header
    values_at = 1 + int(header[1])
    bits = int(header[0]) >> 24
    assert bits > 0
    words[values_at] ^= 0x1
    chunk.write_bytes(words.tobytes())


def _read(layer: Path):
    from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box

    vol = open_layer(str(layer))
    return read_box(vol, layer_bounds(vol))


def test_same_length_garbage_in_a_raw_chunk_fails_the_read_naming_it(tmp_path):
    from exaconnect.precomputed.chunks import DamagedChunkError

    layer = _layer(tmp_path, "image")
    chunk = _chunks(layer)[1]
    _same_length_garbage(chunk)
    with pytest.raises(DamagedChunkError, match=f"{chunk.name}.*checksum"):
        _read(layer)


def test_a_flipped_byte_in_compressed_segmentation_values_fails_the_read(tmp_path):
    from exaconnect.precomputed.chunks import DamagedChunkError, chunk_problem

    layer = _layer(tmp_path, "labels")
    chunk = _chunks(layer)[0]
    _flip_a_packed_value_byte(chunk)
    shape = [int(b) - int(a) for a, b in (r.split("-") for r in chunk.name.split("_"))] + [1]
    assert chunk_problem(chunk.read_bytes(), "compressed_segmentation", shape, np.uint32, (8, 8, 8)) == ""
    with pytest.raises(DamagedChunkError, match=f"{chunk.name}.*checksum"):
        _read(layer)


def test_checksum_verification_can_be_switched_off(tmp_path, monkeypatch):
    from exaconnect.precomputed.checksums import set_checksum_verification

    layer = _layer(tmp_path, "image")
    _same_length_garbage(_chunks(layer)[1])
    set_checksum_verification(False)
    try:
        assert _read(layer).shape == (24, 44, 52)
    finally:
        set_checksum_verification(True)


def test_a_chunk_rewritten_with_a_new_manifest_is_accepted(tmp_path):
    """A chunk rewritten by a later writer (which records its own manifest) is not damage, even
    in a process that cached the older manifest."""
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.layers import open_layer, write_box
    from exaconnect.precomputed.verify import record_checksums

    layer = _layer(tmp_path, "image")
    before = _read(layer)
    vol = open_layer(str(layer))
    box = Box(OFFSET, (OFFSET[0] + 16, OFFSET[1] + 16, OFFSET[2] + 16))
    write_box(vol, box, np.full((16, 16, 16), 7, np.uint8))
    record_checksums(vol, box)
    after = _read(layer)
    assert (after[:16, :16, :16] == 7).all() and (after[16:] == before[16:]).all()


def test_a_downsample_stage_refuses_a_garbled_input_and_checksums_its_output(tmp_path):
    from exaconnect.precomputed.verify import verify_layer
    from exaconnect.services.downsample import DownsampleStage
    from exaconnect.services.runner import RunnerOptions, StageFailed, run_stages

    layer = _layer(tmp_path, "image")
    options = RunnerOptions(queue_root=str(tmp_path / "queues"), record=str(tmp_path / "record"), workers=1,
                            progress=False, max_attempts=1)
    stage = DownsampleStage(layer=str(layer), num_mips=1, factor=(2, 2, 1))
    chunk = _chunks(layer)[2]
    good = chunk.read_bytes()
    _same_length_garbage(chunk)
    with pytest.raises(StageFailed, match=f"{chunk.name}.*checksum"):
        run_stages([stage], options)
    chunk.write_bytes(good)
    from exaconnect.services.queue import purge_dead_letters
    from exaconnect.services.runner import service_queue

    purge_dead_letters(service_queue(options.queue_root, "downsample"))
    run_stages([stage], options)
    report = verify_layer(str(layer), mips=[1])
    mip1 = report["mips"][0]
    assert report["ok"] and mip1["checked_against_manifest"] == mip1["chunks"] > 0, report
    _same_length_garbage(_chunks(layer, 1)[0])
    report = verify_layer(str(layer), mips=[1])
    assert not report["ok"] and "checksum" in report["mips"][0]["damaged"][0]["problem"]
