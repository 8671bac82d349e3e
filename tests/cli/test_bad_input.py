"""Bad input gives one line naming the file or parameter, exit 2, and writes nothing (issue 13, item 8).

Each case is checked twice: on the library function a service or script calls, and on the
command line (`exaconnect.cli.main`), where nothing may be left behind: no layer folder, no
new mip in an existing layer's info, no queue folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from exaconnect.errors import InputError, QueueError
from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box
from exaconnect.precomputed.sources import open_source


def _grey_palette_sections(folder, colour: bool = False):
    from PIL import Image

    folder.mkdir()
    index = (np.arange(40 * 30).reshape(30, 40) % 7).astype(np.uint8)
    for z in range(3):
        image = Image.fromarray(index, mode="P")
        palette = [(i, 0, 255 - i) if colour else (i * 30 % 256,) * 3 for i in range(256)]
        image.putpalette([v for entry in palette for v in entry])
        image.save(folder / f"s{z:02d}.png")
    return index


def _rgb_tiff(path):
    import tifffile

    tifffile.imwrite(path, np.zeros((4, 16, 16, 3), np.uint8), photometric="rgb")


def _cli(argv, capsys) -> tuple[int, str]:
    from exaconnect.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- sources

def test_grey_palette_pngs_are_read_as_their_grey_levels(tmp_path):
    index = _grey_palette_sections(tmp_path / "pal")
    source = open_source(str(tmp_path / "pal"))
    assert source.shape == (3, 30, 40) and source.dtype == np.uint8
    np.testing.assert_array_equal(source.read_slab(0, 3), np.stack([index * 30] * 3))


def test_grey_palette_pngs_ingest_through_the_command(tmp_path, capsys):
    index = _grey_palette_sections(tmp_path / "pal")
    code, err = _cli(["ingest", "run", tmp_path / "pal", tmp_path / "layer", "--resolution", "4,4,40"], capsys)
    assert code == 0, err
    vol = open_layer(str(tmp_path / "layer"))
    np.testing.assert_array_equal(read_box(vol, layer_bounds(vol)), np.stack([index * 30] * 3))


@pytest.mark.parametrize("case,message", [
    ("colour_palette", "colour palette"),
    ("rgb_tiff", "samples per pixel"),
    ("rgb_tiff_sections", "samples per pixel"),
    ("not_hdf5", "is not an HDF5 file"),
])
def test_unsupported_sources_are_named(tmp_path, case, message):
    src = _make_source(tmp_path, case)
    with pytest.raises(InputError, match=message):
        open_source(src)


def _make_source(tmp_path, case) -> str:
    if case == "colour_palette":
        _grey_palette_sections(tmp_path / "palc", colour=True)
        return str(tmp_path / "palc")
    if case == "rgb_tiff":
        _rgb_tiff(tmp_path / "rgb.tif")
        return str(tmp_path / "rgb.tif")
    if case == "rgb_tiff_sections":
        (tmp_path / "sections").mkdir()
        for z in range(2):
            _rgb_tiff(tmp_path / "sections" / f"s{z}.tif")
        return str(tmp_path / "sections")
    if case == "not_hdf5":
        (tmp_path / "x.h5").write_bytes(b"this is not an HDF5 file\n" * 20)
        return f"{tmp_path}/x.h5:stack"
    raise AssertionError(case)


@pytest.mark.parametrize("case,message", [
    ("colour_palette", "colour palette"),
    ("rgb_tiff", "samples per pixel"),
    ("not_hdf5", "is not an HDF5 file"),
])
def test_unsupported_sources_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, case, message):
    src = _make_source(tmp_path, case)
    code, err = _cli(["ingest", "run", src, tmp_path / "layer", "--resolution", "4,4,40"], capsys)
    assert code == 2 and message in _one_line(err)
    assert not (tmp_path / "layer").exists()


# ---------------------------------------------------------------- resolution

@pytest.mark.parametrize("resolution", ["nan,4,4", "inf,4,4", "4,4,-inf"])
def test_non_finite_resolution_exits_2_and_writes_nothing(tmp_path, capsys, resolution):
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    code, err = _cli(["ingest", "run", tmp_path / "x.npy", tmp_path / "layer", "--resolution", resolution], capsys)
    assert code == 2 and "--resolution" in _one_line(err)
    assert not (tmp_path / "layer").exists()


def test_non_finite_resolution_is_refused_by_the_library_too(tmp_path):
    from exaconnect.services.ingest import IngestOptions, ingest_now

    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(InputError, match="resolution"):
        ingest_now(str(tmp_path / "x.npy"), str(tmp_path / "layer"),
                   IngestOptions(resolution=(float("nan"), 4.0, 4.0)), progress=False)
    assert not (tmp_path / "layer").exists()


# ---------------------------------------------------------------- queue URL

def test_unsupported_queue_url_is_refused_before_the_layer_is_written(tmp_path):
    from exaconnect.services.ingest import IngestOptions, create_ingest_tasks

    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(QueueError, match="ftp://"):
        create_ingest_tasks(str(tmp_path / "x.npy"), str(tmp_path / "layer"), IngestOptions(), queue="ftp://host/q")
    assert not (tmp_path / "layer").exists()


@pytest.mark.parametrize("verb", ["run", "enqueue"])
def test_unsupported_queue_url_exits_2_and_writes_nothing(tmp_path, capsys, verb):
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    code, err = _cli(["ingest", verb, tmp_path / "x.npy", tmp_path / "layer", "--resolution", "4,4,4",
                      "--queue", "ftp://host/q"], capsys)
    assert code == 2 and "ftp://host/q" in _one_line(err)
    assert not (tmp_path / "layer").exists()


# ---------------------------------------------------------------- downsample --bbox

def _small_layer(tmp_path):
    from exaconnect.services.ingest import IngestOptions, ingest_now

    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 255, (20, 40, 40)).astype(np.uint8))
    ingest_now(str(tmp_path / "x.npy"), str(tmp_path / "layer"),
               IngestOptions(voxel_offset=(10, 20, 30), chunk_size=(16, 16, 16)), progress=False)
    return tmp_path / "layer"


@pytest.mark.parametrize("bbox", [(0, 0, 0, 20, 20, 20), (10, 20, 30, 51, 60, 50), (100, 100, 100, 120, 120, 120)])
def test_downsample_bbox_outside_the_layer_adds_no_mip(tmp_path, bbox):
    from exaconnect.precomputed.bbox import Box
    from exaconnect.services.downsample import create_downsample_tasks

    layer = _small_layer(tmp_path)
    info = (layer / "info").read_text()
    with pytest.raises(InputError, match="outside the layer"):
        create_downsample_tasks(str(layer), num_mips=1, bbox=Box(bbox[:3], bbox[3:]))
    assert (layer / "info").read_text() == info


def test_downsample_enqueue_bbox_outside_exits_2_and_adds_no_mip(tmp_path, capsys):
    layer = _small_layer(tmp_path)
    info = json.loads((layer / "info").read_text())
    code, err = _cli(["downsample", "enqueue", layer, "--bbox", "0,0,0,64,64,64", "--queue", tmp_path / "q"], capsys)
    assert code == 2 and "--bbox" in _one_line(err)
    assert json.loads((layer / "info").read_text()) == info
    assert not list((tmp_path / "q").rglob("*.json")) if (tmp_path / "q").exists() else True
