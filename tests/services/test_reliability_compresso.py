"""Issue 24, item 2: a garbled compresso chunk body cannot take the process down. Chunks that a
checksum manifest does not vouch for are decoded in a separate helper process; a decoder crash
there fails the read with the chunk named, and the command exits with an error (not 139),
cleaning up its temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exaconnect.services.ingest import IngestOptions, ingest_now

OFFSET = (7, 5, 3)


def _labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 6, (4, 4, 4)).repeat(8, 0).repeat(8, 1).repeat(8, 2).astype(np.uint32)
    labels[3:7, 5:20, :] = 99
    return labels


def _garble(data: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    start = 36 + int(rng.integers(0, len(out) - 36 - 64))
    out[start:start + 64] = rng.integers(0, 256, 64).astype(np.uint8).tobytes()
    return bytes(out)


def _crashes_in_process(data: bytes) -> bool:
    """Whether the decoder crashes on `data` as a worker would run it (a child forked from the
    helper's pristine state: the outcome depends on the bytes, not on earlier decodes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from bench_faults import decoder_crashes

    return decoder_crashes(data)


def test_isolated_decode_survives_a_decoder_crash_and_names_the_chunk():
    import compresso

    from exaconnect.precomputed.chunks import DamagedChunkError
    from exaconnect.precomputed.isolated_decode import decode_compresso_isolated

    labels = _labels()
    good = compresso.compress(labels)
    out = decode_compresso_isolated(good, (32, 32, 32, 1), np.uint32, "layer/8_8_8/0-32_0-32_0-32")
    assert out.shape == (32, 32, 32, 1) and np.array_equal(out[..., 0], labels)
    crashing = [d for d in (_garble(good, s) for s in range(40)) if _crashes_in_process(d)][:4]
    assert crashing, "no garble crashed the decoder: the test would prove nothing"
    for data in crashing:
        for _ in range(2):  # the same answer every time: it depends on the bytes alone
            with pytest.raises(DamagedChunkError, match=r"0-32_0-32_0-32 is damaged: the compresso decoder crashed \(SIG"):
                decode_compresso_isolated(data, (32, 32, 32, 1), np.uint32, "layer/8_8_8/0-32_0-32_0-32")
    # The helper is replaced after a crash: good chunks still decode.
    assert np.array_equal(decode_compresso_isolated(good, (32, 32, 32, 1), np.uint32, "x")[..., 0], labels)


def _compresso_layer(tmp_path) -> Path:
    """A 70x52x40 compresso layer off the origin in 32^3 chunks (edges not on the grid)."""
    labels = np.zeros((40, 52, 70), np.uint32)
    rng = np.random.default_rng(2)
    for i in range(1, 12):
        z, y, x = rng.integers(0, 30), rng.integers(0, 40), rng.integers(0, 55)
        labels[z:z + 12, y:y + 14, x:x + 16] = i
    np.save(tmp_path / "labels.npy", labels)
    ingest_now(str(tmp_path / "labels.npy"), str(tmp_path / "seg"),
               IngestOptions("segmentation", voxel_offset=OFFSET, chunk_size=(32, 32, 32), encoding="compresso"),
               progress=False)
    return tmp_path / "seg"


def _crashing_chunk(layer: Path) -> Path:
    info = json.loads((layer / "info").read_text())
    for chunk in sorted((layer / info["scales"][0]["key"]).iterdir()):
        data = chunk.read_bytes()
        for seed in range(40):
            garbled = _garble(data, seed)
            if len(data) > 200 and _crashes_in_process(garbled):
                chunk.write_bytes(garbled)
                return chunk
    pytest.skip("no garble of this layer's chunks crashes compresso's decoder in process")


@pytest.mark.parametrize("checksums", ["on", "off"])
def test_mesh_run_on_a_garbled_compresso_chunk_exits_with_an_error_naming_it(tmp_path, checksums):
    layer = _compresso_layer(tmp_path)
    chunk = _crashing_chunk(layer)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "EXACONNECT_VERIFY_CHECKSUMS": "1" if checksums == "on" else "0"}
    done = subprocess.run([sys.executable, "-m", "exaconnect", "mesh", "run", str(layer), "--shape", "48,48,48"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode not in (0, -11, 139), done.stderr[-3000:]
    assert chunk.name in done.stderr, done.stderr[-3000:]
    # No temporary folder left behind, except the one the error names as kept for its failure records.
    left = [p for p in tmp.iterdir() if p.name.startswith("exaconnect-")]
    assert all(f"kept in {p}" in done.stderr for p in left), (left, done.stderr[-3000:])


def test_a_good_compresso_layer_still_meshes(tmp_path):
    layer = _compresso_layer(tmp_path)
    shutil.rmtree(layer / "checksums", ignore_errors=True)  # decoded through the helper, unverified
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "exaconnect", "mesh", "run", str(layer), "--shape", "48,48,48"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    mesh_dir = layer / json.loads((layer / "info").read_text())["mesh"]
    assert len([p for p in mesh_dir.iterdir() if p.name.endswith(":0")]) >= 5
