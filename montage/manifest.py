"""Tile manifests: which image file is which tile of which section, at which stage position.

Two forms are read:
  - CSV with a header `z,path,x,y` (more columns are ignored): `x`, `y` are the nominal top-left
    stage position of the tile in pixels, `path` is relative to the CSV's folder;
  - render-ws tile specs (JSON): a list of specs (or `{"tileSpecs": [...]}`) with `tileId`, `z`,
    `width`, `height`, `layout.stageX`/`stageY` and `mipmapLevels["0"].imageUrl` (a `file://`
    URL or a path, relative paths from the JSON's folder).

`read_manifest` checks the whole manifest before returning, so that a run never starts on a
tile set it would fail on halfway: every file is opened (header only), and sizes, dtypes,
sections and positions are checked. Each problem names the tile (section, path, and the line or
tileId it came from). Tiles are 2-D PNG or TIFF images, 8- or 16-bit.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from urllib.parse import unquote, urlparse

import numpy as np

from exaconnect.errors import InputError

TILE_SUFFIXES = (".png", ".tif", ".tiff")
TILE_DTYPES = ("uint8", "uint16")


@dataclass(frozen=True)
class Tile:
    """One tile: its section `z`, absolute `path`, nominal stage position `x`, `y` (top-left,
    pixels) and its size; `source` says where in the manifest it was declared."""

    z: int
    path: str
    x: float
    y: float
    width: int = 0
    height: int = 0
    dtype: str = ""
    tile_id: str = ""
    source: str = ""

    @property
    def name(self) -> str:
        return self.tile_id or os.path.basename(self.path)

    def describe(self) -> str:
        return f"tile {self.name} (section z={self.z}, {self.path}, {self.source})"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Tile":
        return cls(**data)


@dataclass(frozen=True)
class ManifestRules:
    """What a manifest may contain beyond the strict default.

    `skip_missing_tiles`: a missing or unreadable tile file is left out of its section (and listed
    in `TileSet.skipped`) instead of failing the whole manifest; the section is still made from
    the other tiles. `allow_mixed_sizes`: tiles of different sizes in one tile set.
    `allow_missing_sections`: gaps in z (sections with no tiles) are allowed."""

    skip_missing_tiles: bool = False
    allow_mixed_sizes: bool = False
    allow_missing_sections: bool = False


@dataclass
class TileSet:
    """A checked manifest: tiles grouped by section, plus those skipped and why."""

    manifest: str
    tiles: list[Tile]
    skipped: list[dict] = field(default_factory=list)

    @property
    def sections(self) -> list[int]:
        return sorted({t.z for t in self.tiles} | {int(s["z"]) for s in self.skipped})

    def section(self, z: int) -> list[Tile]:
        return [t for t in self.tiles if t.z == z]

    @property
    def dtype(self) -> str:
        return self.tiles[0].dtype

    def as_dict(self) -> dict:
        return {"manifest": self.manifest, "tiles": [t.as_dict() for t in self.tiles], "skipped": self.skipped}

    @classmethod
    def from_dict(cls, data: dict) -> "TileSet":
        return cls(data["manifest"], [Tile.from_dict(t) for t in data["tiles"]], list(data.get("skipped", [])))


# ---------------------------------------------------------------- reading tile files

def tile_header(path: str) -> tuple[int, int, str]:
    """(height, width, dtype) of a tile file without decoding its pixels; InputError if it is
    not a readable 2-D 8- or 16-bit PNG or TIFF."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TILE_SUFFIXES:
        raise InputError(f"{path}: unsupported tile file type {suffix!r}; expected one of {TILE_SUFFIXES}")
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                width, height = image.size
                modes = {"L": "uint8", "I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16"}
                if image.mode not in modes:
                    raise InputError(f"{path}: PNG mode {image.mode!r}; expected a grayscale 8- or 16-bit tile")
                return height, width, modes[image.mode]
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape, dtype = tuple(page.shape), np.dtype(page.dtype).name
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: tile file does not exist") from None
    except Exception as exc:  # PIL and tifffile raise many kinds on damaged files
        raise InputError(f"{path}: cannot read the tile image ({type(exc).__name__}: {exc})") from None
    if len(shape) != 2:
        raise InputError(f"{path}: TIFF page of shape {shape}; expected a 2-D grayscale tile")
    if dtype not in TILE_DTYPES:
        raise InputError(f"{path}: dtype {dtype}; expected one of {TILE_DTYPES}")
    return shape[0], shape[1], dtype


def read_tile(path: str) -> np.ndarray:
    """The pixels of a tile file as a 2-D uint8/uint16 array."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image)
                if image.mode.startswith("I;16"):
                    array = array.astype(np.uint16)
        else:
            import tifffile

            array = tifffile.imread(path, key=0)
    except FileNotFoundError:
        raise InputError(f"{path}: tile file does not exist") from None
    except Exception as exc:
        raise InputError(f"{path}: cannot read the tile image ({type(exc).__name__}: {exc})") from None
    if array.ndim != 2 or array.dtype.name not in TILE_DTYPES:
        raise InputError(f"{path}: tile of shape {array.shape} and dtype {array.dtype}; expected a 2-D 8- or 16-bit image")
    return array


def write_tile(path: str, array: np.ndarray) -> None:
    """Write a 2-D uint8/uint16 tile as PNG or TIFF (by suffix); for test and demo tile sets."""
    if os.path.splitext(path)[1].lower() == ".png":
        from PIL import Image

        Image.fromarray(array).save(path)
    else:
        import tifffile

        tifffile.imwrite(path, array)


# ---------------------------------------------------------------- parsing the two forms

def _number(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise InputError(f"{what}: {value!r} is not a finite number")
    return number


def _section(value, what: str) -> int:
    number = _number(value, what)
    if number != int(number) or number < 0:
        raise InputError(f"{what}: z {value!r}; expected a non-negative whole number")
    return int(number)


def _parse_csv(path: str) -> list[Tile]:
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("z", "path", "x", "y") if c not in columns]
        if missing:
            raise InputError(f"tile manifest {path}: header {columns} lacks {missing}; expected a header 'z,path,x,y'")
        tiles = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            where = f"{path} line {line}"
            if not row["path"]:
                raise InputError(f"{where}: empty path; expected a tile image path relative to {folder}")
            tiles.append(Tile(z=_section(row["z"], where), path=os.path.normpath(os.path.join(folder, row["path"])),
                              x=_number(row["x"], f"{where} x"), y=_number(row["y"], f"{where} y"),
                              source=f"line {line}"))
    return tiles


def _url_path(url: str, folder: str, where: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise InputError(f"{where}: imageUrl {url!r}; expected a file:// URL or a path (remote tiles are not read)")
    return os.path.normpath(os.path.join(folder, url))


def _parse_tile_specs(path: str) -> list[Tile]:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as exc:
        raise InputError(f"tile manifest {path}: not valid JSON ({exc}); expected render-ws tile specs") from None
    if isinstance(data, dict) and "tileSpecs" in data:
        data = data["tileSpecs"]
    if not isinstance(data, list):
        raise InputError(f"tile manifest {path}: expected a JSON list of render-ws tile specs")
    tiles = []
    for index, spec in enumerate(data):
        where = f"{path} tile spec {index}"
        if not isinstance(spec, dict):
            raise InputError(f"{where}: expected an object")
        tile_id = str(spec.get("tileId", ""))
        if tile_id:
            where += f" ({tile_id})"
        try:
            layout, url = spec["layout"], spec["mipmapLevels"]["0"]["imageUrl"]
            stage_x, stage_y, z = layout["stageX"], layout["stageY"], spec["z"]
        except (KeyError, TypeError) as exc:
            raise InputError(f"{where}: missing {exc}; expected tileId, z, width, height, layout.stageX/stageY "
                             "and mipmapLevels['0'].imageUrl") from None
        width, height = spec.get("width"), spec.get("height")
        tiles.append(Tile(z=_section(z, where), path=_url_path(str(url), folder, where),
                          x=_number(stage_x, f"{where} stageX"), y=_number(stage_y, f"{where} stageY"),
                          width=int(_number(width, f"{where} width")) if width is not None else 0,
                          height=int(_number(height, f"{where} height")) if height is not None else 0,
                          tile_id=tile_id, source=f"tile spec {index}"))
    return tiles


# ---------------------------------------------------------------- the whole-manifest check

def read_manifest(path: str, rules: ManifestRules = ManifestRules()) -> TileSet:
    """Parse and check a manifest (CSV or render-ws JSON, by suffix); InputError naming the tile
    on the first problem found (see `ManifestRules` for what may be relaxed)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise InputError(f"tile manifest {path} does not exist; expected a CSV (z,path,x,y) or render-ws tile-spec JSON")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".csv":
        declared = _parse_csv(path)
    elif suffix == ".json":
        declared = _parse_tile_specs(path)
    else:
        raise InputError(f"tile manifest {path}: unsupported suffix {suffix!r}; expected .csv or .json")
    if not declared:
        raise InputError(f"tile manifest {path} lists no tiles")
    return check_tiles(path, declared, rules)


def check_tiles(manifest: str, declared: list[Tile], rules: ManifestRules = ManifestRules()) -> TileSet:
    """Open every tile's header and check the set as a whole (see `read_manifest`)."""
    tiles, skipped = [], []
    for tile in declared:
        try:
            height, width, dtype = tile_header(tile.path)
        except InputError as exc:
            if not rules.skip_missing_tiles:
                raise InputError(f"tile manifest {manifest}: {tile.describe()}: {exc}") from None
            skipped.append({"z": tile.z, "tile": tile.name, "path": tile.path, "reason": str(exc)})
            continue
        if (tile.width and tile.width != width) or (tile.height and tile.height != height):
            raise InputError(f"tile manifest {manifest}: {tile.describe()} declares {tile.width}x{tile.height} px "
                             f"but the file is {width}x{height}")
        tiles.append(Tile(tile.z, tile.path, tile.x, tile.y, width, height, dtype, tile.tile_id, tile.source))
    if not tiles:
        raise InputError(f"tile manifest {manifest}: none of its {len(declared)} tiles can be read")
    first = tiles[0]
    for tile in tiles[1:]:
        if tile.dtype != first.dtype:
            raise InputError(f"tile manifest {manifest}: {tile.describe()} is {tile.dtype} but "
                             f"{first.describe()} is {first.dtype}; expected one dtype for the whole tile set")
        if not rules.allow_mixed_sizes and (tile.width, tile.height) != (first.width, first.height):
            raise InputError(f"tile manifest {manifest}: {tile.describe()} is {tile.width}x{tile.height} px but "
                             f"{first.describe()} is {first.width}x{first.height}; expected tiles of one size "
                             "(or allow mixed sizes)")
    seen: dict[tuple, Tile] = {}
    for tile in tiles:
        for key in ((tile.z, "position", tile.x, tile.y), (tile.z, "path", tile.path)):
            if key in seen:
                what = "stage position" if key[1] == "position" else "file"
                raise InputError(f"tile manifest {manifest}: {tile.describe()} has the same {what} as "
                                 f"{seen[key].describe()}; expected each tile once per section")
            seen[key] = tile
    sections = sorted({t.z for t in declared})
    empty = [z for z in range(sections[0], sections[-1] + 1) if not any(t.z == z for t in tiles)]
    if empty and not rules.allow_missing_sections:
        detail = "; ".join(f"z={z}: " + ("all its tiles were skipped" if z in sections else "no tile listed")
                           for z in empty[:10])
        raise InputError(f"tile manifest {manifest}: sections without tiles between z={sections[0]} and "
                         f"z={sections[-1]} ({detail}); expected every section to have tiles")
    tiles.sort(key=lambda t: (t.z, t.y, t.x))
    return TileSet(manifest, tiles, skipped)


def write_csv_manifest(path: str, tiles: list[tuple[int, str, float, float]]) -> None:
    """Write `z,path,x,y` rows (paths as given, relative to the CSV's folder)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["z", "path", "x", "y"])
        for z, tile_path, x, y in tiles:
            writer.writerow([z, tile_path, x, y])
