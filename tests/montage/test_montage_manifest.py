"""Tile manifests (montage/manifest.py): CSV and render-ws tile specs, PNG and TIFF, 8 and 16 bit,
and the whole-manifest check that names the tile at fault."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.montage.manifest import ManifestRules, read_manifest, read_tile, write_csv_manifest, write_tile


def tile(seed, shape=(40, 50), dtype=np.uint8):
    return np.random.default_rng(seed).integers(1, 200, shape).astype(dtype)


@pytest.fixture
def tile_set(tmp_path):
    (tmp_path / "tiles").mkdir()
    rows = []
    for z in (3, 4):
        for k, (x, y) in enumerate([(10, 20), (55.5, 20), (10, 57)]):
            name = f"tiles/s{z}_{k}.png"
            write_tile(str(tmp_path / name), tile(z * 10 + k))
            rows.append((z, name, x, y))
    write_csv_manifest(str(tmp_path / "tiles.csv"), rows)
    return tmp_path, rows


def test_csv_manifest_reads_every_tile(tile_set):
    root, rows = tile_set
    tiles = read_manifest(str(root / "tiles.csv"))
    assert tiles.sections == [3, 4]
    assert len(tiles.section(3)) == 3
    first = tiles.section(3)[0]
    assert (first.x, first.y, first.width, first.height, first.dtype) == (10, 20, 50, 40, "uint8")
    assert first.path == str(root / "tiles" / "s3_0.png")
    assert np.array_equal(read_tile(first.path), tile(30))


def test_render_ws_tile_specs_with_file_urls_and_16_bit_tiff(tmp_path):
    specs = []
    for k, (x, y) in enumerate([(0.0, 0.0), (45.0, 1.5)]):
        path = tmp_path / f"t{k}.tif"
        write_tile(str(path), tile(k, dtype=np.uint16) * 300)
        specs.append({"tileId": f"t{k}", "z": 7.0, "width": 50, "height": 40,
                      "layout": {"stageX": x, "stageY": y},
                      "mipmapLevels": {"0": {"imageUrl": path.as_uri() if k == 0 else path.name}}})
    (tmp_path / "tiles.json").write_text(json.dumps(specs))
    tiles = read_manifest(str(tmp_path / "tiles.json"))
    assert [t.tile_id for t in tiles.tiles] == ["t0", "t1"]
    assert tiles.dtype == "uint16" and tiles.sections == [7]
    assert read_tile(tiles.tiles[1].path).max() > 255
    # A declared size that the file does not have is an error naming the tile.
    specs[1]["width"] = 60
    (tmp_path / "tiles.json").write_text(json.dumps({"tileSpecs": specs}))
    with pytest.raises(InputError, match="tile t1 .*declares 60x40"):
        read_manifest(str(tmp_path / "tiles.json"))


def test_missing_tile_is_named_or_skipped_by_rule(tile_set):
    root, _ = tile_set
    (root / "tiles" / "s4_1.png").unlink()
    with pytest.raises(InputError, match=r"s4_1\.png.*z=4.*line 6.*does not exist"):
        read_manifest(str(root / "tiles.csv"))
    tiles = read_manifest(str(root / "tiles.csv"), ManifestRules(skip_missing_tiles=True))
    assert len(tiles.section(4)) == 2
    assert tiles.skipped[0]["tile"] == "s4_1.png" and "does not exist" in tiles.skipped[0]["reason"]


def test_unreadable_tile_is_named(tile_set):
    root, _ = tile_set
    (root / "tiles" / "s3_2.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"s3_2\.png.*cannot read"):
        read_manifest(str(root / "tiles.csv"))


def test_mixed_sizes_and_dtypes_are_refused(tile_set):
    root, _ = tile_set
    write_tile(str(root / "tiles" / "s4_2.png"), tile(1, shape=(41, 50)))
    with pytest.raises(InputError, match=r"s4_2\.png.*50x41.*one size"):
        read_manifest(str(root / "tiles.csv"))
    assert len(read_manifest(str(root / "tiles.csv"), ManifestRules(allow_mixed_sizes=True)).tiles) == 6
    write_tile(str(root / "tiles" / "s4_2.png"), tile(1, dtype=np.uint16))
    with pytest.raises(InputError, match=r"s4_2\.png.*uint16.*one dtype"):
        read_manifest(str(root / "tiles.csv"))


def test_duplicate_positions_and_sections_without_tiles(tile_set):
    root, rows = tile_set
    write_csv_manifest(str(root / "dup.csv"), rows + [(3, "tiles/s4_0.png", 10, 20)])
    with pytest.raises(InputError, match=r"s4_0\.png.*same stage position"):
        read_manifest(str(root / "dup.csv"))
    write_csv_manifest(str(root / "gap.csv"), rows + [(6, "tiles/s4_0.png", 10, 20)])
    with pytest.raises(InputError, match="z=5: no tile listed"):
        read_manifest(str(root / "gap.csv"))
    assert read_manifest(str(root / "gap.csv"), ManifestRules(allow_missing_sections=True)).sections == [3, 4, 6]


def test_malformed_rows_name_the_line(tmp_path):
    (tmp_path / "a.csv").write_text("z,path,x\n0,a.png,1\n")
    with pytest.raises(InputError, match="lacks \\['y'\\]"):
        read_manifest(str(tmp_path / "a.csv"))
    (tmp_path / "b.csv").write_text("z,path,x,y\n0,a.png,one,2\n")
    with pytest.raises(InputError, match="line 2 x.*not a number"):
        read_manifest(str(tmp_path / "b.csv"))
    (tmp_path / "c.csv").write_text("z,path,x,y\n1.5,a.png,1,2\n")
    with pytest.raises(InputError, match="whole number"):
        read_manifest(str(tmp_path / "c.csv"))
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(str(tmp_path / "none.csv"))
