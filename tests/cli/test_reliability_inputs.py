"""Issue 24, items 6, 7, 9, 10: bad layer URLs, empty downsamples, corrupt gzip chunks and
truncated images are each one clear error naming what is wrong, and nothing is half-written."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from exaconnect.errors import InputError


from conftest import one_line as _one_line  # noqa: E402
from conftest import run_cli as _cli  # noqa: E402


# ---------------------------------------------------------------- item 10: unknown URL schemes

@pytest.mark.parametrize("url", ["ftp://host/layer", "sftp://host/x", "FTP://host/layer", "precomputed://ftp://h/l",
                                 "hdfs://nn:9000/layer"])
def test_unknown_url_schemes_are_refused_naming_the_scheme(url):
    from exaconnect.precomputed.layers import layer_url, local_path

    with pytest.raises(InputError, match="unsupported .*scheme"):
        layer_url(url)
    with pytest.raises(InputError, match="scheme"):
        local_path(url)


@pytest.mark.parametrize("url", ["gs://b/l", "s3://b/l", "https://h/l", "file:///tmp/l", "mem://x"])
def test_known_url_schemes_still_pass_through(url):
    from exaconnect.precomputed.layers import layer_url

    assert layer_url(url) == url


def test_a_local_path_with_a_colon_is_still_a_path(tmp_path):
    from exaconnect.precomputed.layers import layer_url

    assert layer_url(str(tmp_path / "a:b")) == "file://" + str(tmp_path / "a:b")


def test_ingest_to_an_ftp_url_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    code, _, err = _cli(["ingest", "run", tmp_path / "x.npy", "ftp://host/layer", "--resolution", "4,4,40"], capsys)
    assert code == 2 and "ftp://host/layer" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_link_to_an_ftp_layer_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(["link", "ftp://host/layer"], capsys)
    assert code == 2 and "ftp://host/layer" in _one_line(err)
    assert list(tmp_path.iterdir()) == []



# ---------------------------------------------------------------- item 9: a downsample that makes nothing

def _layer_64x64x32(tmp_path):
    """64×64×32 voxels in 32³ chunks, off the origin: with factor 2 in z there is no whole mip to make."""
    from exaconnect.services.ingest import IngestOptions, ingest_now

    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 255, (32, 64, 64)).astype(np.uint8))
    ingest_now(str(tmp_path / "x.npy"), str(tmp_path / "layer"),
               IngestOptions(voxel_offset=(5, 7, 9), chunk_size=(32, 32, 32)), progress=False)
    return tmp_path / "layer"


@pytest.mark.parametrize("num_mips,message", [(2, "no mip"), (0, "--num-mips"), (-1, "--num-mips")])
def test_a_downsample_that_makes_no_mip_is_an_error_naming_the_layer(tmp_path, num_mips, message):
    from exaconnect.errors import ExaconnectError
    from exaconnect.services.downsample import create_downsample_tasks

    layer = _layer_64x64x32(tmp_path)
    info = (layer / "info").read_text()
    with pytest.raises(ExaconnectError, match=message) as caught:
        create_downsample_tasks(str(layer), num_mips=num_mips)
    assert str(layer) in str(caught.value)
    assert (layer / "info").read_text() == info


def test_a_downsample_that_can_make_a_mip_still_does(tmp_path):
    from exaconnect.services.downsample import create_downsample_tasks

    layer = _layer_64x64x32(tmp_path)
    assert create_downsample_tasks(str(layer), num_mips=2, factor=(2, 2, 1))
    assert len(json.loads((layer / "info").read_text())["scales"]) == 2


@pytest.mark.parametrize("num_mips", ["2", "0"])
def test_downsample_run_that_makes_nothing_exits_2(tmp_path, capsys, num_mips):
    layer = _layer_64x64x32(tmp_path)
    info = (layer / "info").read_text()
    code, _, err = _cli(["downsample", "run", layer, "--num-mips", num_mips], capsys)
    assert code == 2 and str(layer) in _one_line(err)
    assert (layer / "info").read_text() == info


# ---------------------------------------------------------------- item 6: a corrupt gzip chunk

_GARBLES = {
    "truncated": lambda gz: gz[: len(gz) // 2],
    "flipped_byte": lambda gz: gz[:20] + bytes([gz[20] ^ 0xFF]) + gz[21:],
    "not_gzip": lambda gz: b"not gzip at all " * 8,
}


def _layer_with_a_garbled_gzip_chunk(tmp_path, garble: str):
    """A 40x36x20 label layer off the origin in 16^3 chunks whose first chunk is stored gzipped
    (as on an object store) and then garbled. Returns (layer, chunk name, bounds)."""
    from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, write_box

    spec = LayerSpec("segmentation", "uint32", (40, 36, 20), voxel_offset=(3, 5, 7), chunk_size=(16, 16, 16))
    vol = create_layer(str(tmp_path / "seg"), spec, Provenance("test"))
    write_box(vol, spec.bounds, (np.arange(20 * 36 * 40).reshape(20, 36, 40) % 17).astype(np.uint32))
    key = vol.meta.key(0)
    chunk = sorted((tmp_path / "seg" / key).iterdir())[0]
    body = chunk.read_bytes()
    chunk.unlink()
    (chunk.parent / (chunk.name + ".gz")).write_bytes(_GARBLES[garble](gzip.compress(body)))
    return tmp_path / "seg", f"{key}/{chunk.name}", spec.bounds


@pytest.mark.parametrize("garble", sorted(_GARBLES))
def test_verify_reports_a_corrupt_gzip_chunk(tmp_path, garble):
    from exaconnect.precomputed.verify import verify_layer

    layer, name, _ = _layer_with_a_garbled_gzip_chunk(tmp_path, garble)
    report = verify_layer(str(layer))
    assert report["ok"] is False
    damaged = report["mips"][0]["damaged"]
    assert [d["chunk"] for d in damaged] == [name]
    assert "decompress" in damaged[0]["problem"]


def test_layer_verify_command_reports_a_corrupt_gzip_chunk_and_exits_1(tmp_path, capsys):
    layer, name, _ = _layer_with_a_garbled_gzip_chunk(tmp_path, "flipped_byte")
    code, out, err = _cli(["layer", "verify", layer, "--compact"], capsys)
    assert code == 1, err
    report = json.loads(out)
    assert report["mips"][0]["damaged"][0]["chunk"] == name
    assert "Traceback" not in err


@pytest.mark.parametrize("garble", sorted(_GARBLES))
def test_reading_a_corrupt_gzip_chunk_names_it(tmp_path, garble):
    from exaconnect.precomputed.chunks import DamagedChunkError
    from exaconnect.precomputed.layers import open_layer, read_box

    layer, name, bounds = _layer_with_a_garbled_gzip_chunk(tmp_path, garble)
    with pytest.raises(DamagedChunkError, match=name.split("/")[-1]):
        read_box(open_layer(str(layer)), bounds)


def test_a_downsample_task_on_a_corrupt_gzip_chunk_fails_naming_it(tmp_path):
    import functools

    from exaconnect.precomputed.chunks import DamagedChunkError
    from exaconnect.services.downsample import create_downsample_tasks

    layer, name, _ = _layer_with_a_garbled_gzip_chunk(tmp_path, "truncated")
    tasks = create_downsample_tasks(str(layer), num_mips=1, factor=(2, 2, 1), allow_missing=True)
    with pytest.raises(DamagedChunkError, match=name.split("/")[-1]):
        for task in tasks:
            made = task() if isinstance(task, functools.partial) else task
            if made is not None:
                made.execute()


# ---------------------------------------------------------------- item 7: truncated sections

def _sections(folder, suffix: str, count: int = 4):
    """`count` 37x29 uint8 sections (odd sizes), returned as the [z, y, x] stack."""
    import imageio.v3 as iio

    folder.mkdir()
    stack = np.random.default_rng(1).integers(0, 255, (count, 29, 37)).astype(np.uint8)
    for z in range(count):
        iio.imwrite(folder / f"s{z:03d}{suffix}", stack[z])
    return stack


def _truncate(path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_truncated_section_is_named_by_the_pre_check(tmp_path, suffix):
    from exaconnect.precomputed.sources import open_source

    _sections(tmp_path / "secs", suffix)
    _truncate(tmp_path / "secs" / f"s002{suffix}")
    with pytest.raises(InputError, match=f"s002\\{suffix}.*truncated"):
        open_source(str(tmp_path / "secs"))


def test_a_truncated_multipage_tiff_is_named_by_the_pre_check(tmp_path):
    import tifffile

    from exaconnect.precomputed.sources import open_source

    tifffile.imwrite(tmp_path / "stack.tif", np.random.default_rng(2).integers(0, 255, (5, 29, 37)).astype(np.uint8))
    _truncate(tmp_path / "stack.tif", keep=0.8)
    with pytest.raises(InputError, match="stack.tif.*truncated"):
        open_source(str(tmp_path / "stack.tif"))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_ingest_of_a_truncated_section_exits_2_and_writes_nothing(tmp_path, capsys, suffix):
    _sections(tmp_path / "secs", suffix)
    _truncate(tmp_path / "secs" / f"s003{suffix}")
    code, _, err = _cli(["ingest", "run", tmp_path / "secs", tmp_path / "layer", "--resolution", "4,4,40"], capsys)
    assert code == 2 and f"s003{suffix}" in _one_line(err)
    assert not (tmp_path / "layer").exists()


def test_intact_sections_still_pass_the_pre_check(tmp_path):
    from exaconnect.precomputed.sources import open_source

    for suffix in (".png", ".tif"):
        stack = _sections(tmp_path / f"secs{suffix}", suffix)
        np.testing.assert_array_equal(open_source(str(tmp_path / f"secs{suffix}")).read_slab(0, 4), stack)


def test_a_section_whose_pixels_do_not_decode_is_named_when_read(tmp_path):
    """A PNG whose structure is whole but whose compressed pixels are garbage passes the cheap
    pre-check (headers and chunk lengths only); reading it must still name the file."""
    import struct
    import zlib

    from exaconnect.precomputed.sources import open_source

    _sections(tmp_path / "secs", ".png")
    path = tmp_path / "secs" / "s001.png"
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4: at])[0]
    data[at + 4: at + 4 + length] = bytes(length)  # zeros: not a zlib stream, CRC fixed below
    data[at + 4 + length: at + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[at: at + 4 + length])))
    path.write_bytes(bytes(data))
    source = open_source(str(tmp_path / "secs"))
    with pytest.raises(InputError, match="s001.png"):
        source.read_slab(0, 4)
