"""Image stacks to ingest: a folder of PNG/TIFF sections, a multi-page TIFF, `file.h5:dataset`
or a `.npy`, all presented as [z, y, x] arrays read one z-slab at a time.

Sources are opened from their SRC string alone, so an ingest task carries only that string.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from exaconnect.errors import InputError

SECTION_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass
class StackSource:
    """A [z, y, x] stack with its shape and dtype known before any voxel is read."""

    description: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    _read: Callable[[int, int], np.ndarray]

    def read_slab(self, z_start: int, z_stop: int) -> np.ndarray:
        if not 0 <= z_start < z_stop <= self.shape[0]:
            raise InputError(f"{self.description}: z range {z_start}:{z_stop} is outside 0:{self.shape[0]}")
        slab = np.asarray(self._read(z_start, z_stop))
        expected = (z_stop - z_start, *self.shape[1:])
        if slab.shape != expected:
            raise InputError(f"{self.description}: read shape {slab.shape} for z {z_start}:{z_stop}; expected {expected}")
        return slab


def absolute_source(src: str) -> str:
    """SRC with its file part made absolute (`rel/x.h5:ds` -> `/abs/rel/x.h5:ds`), so that a task
    carrying it opens the same file from any working directory."""
    text = str(src)
    path_part, sep, dataset = text.partition(".h5:")
    if sep:
        return os.path.abspath(os.path.expanduser(path_part + ".h5")) + ":" + dataset
    return os.path.abspath(os.path.expanduser(text))


def open_source(src: str) -> StackSource:
    """Open SRC, checking that every section has the same size before returning."""
    text = str(src)
    path_part, _, dataset = text.partition(".h5:")
    if dataset:
        return _open_hdf5(path_part + ".h5", dataset)
    path = Path(text)
    if not path.exists():
        raise InputError(f"source {text} does not exist; expected a folder of sections, a TIFF, file.h5:dataset or a .npy")
    if path.is_dir():
        return _open_section_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _open_npy(path)
    if suffix in (".tif", ".tiff"):
        return _open_multipage_tiff(path)
    if suffix in (".h5", ".hdf5"):
        raise InputError(f"source {text}: name the dataset as {text}:DATASET")
    raise InputError(f"source {text}: unsupported file type {suffix!r}; expected a folder, .tif, .h5:dataset or .npy")


def _as_stack(array: np.ndarray, description: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise InputError(f"{description}: array has {array.ndim} dimensions; expected a [z, y, x] stack")
    return array


def _open_npy(path: Path) -> StackSource:
    try:
        array = _as_stack(np.load(path, mmap_mode="r"), str(path))
    except ValueError as exc:
        raise InputError(f"source {path}: not a readable .npy array ({exc})") from exc

    def read(z_start: int, z_stop: int) -> np.ndarray:
        return _as_stack(np.load(path, mmap_mode="r"), str(path))[z_start:z_stop]

    return StackSource(str(path), tuple(array.shape), array.dtype, read)  # type: ignore[arg-type]


def _open_hdf5(path_text: str, dataset: str) -> StackSource:
    import h5py

    if not os.path.exists(path_text):
        raise InputError(f"source {path_text} does not exist; expected an HDF5 file")
    if not h5py.is_hdf5(path_text):
        raise InputError(f"source {path_text} is not an HDF5 file; expected FILE.h5:DATASET naming an HDF5 dataset")
    try:
        with h5py.File(path_text, "r") as f:
            if dataset not in f:
                raise InputError(f"source {path_text} has no dataset {dataset!r}; it has {sorted(f.keys())}")
            ds = f[dataset]
            if not isinstance(ds, h5py.Dataset):
                raise InputError(f"source {path_text}:{dataset} is an HDF5 group; expected a dataset")
            shape, dtype = tuple(ds.shape), ds.dtype
    except OSError as exc:
        raise InputError(f"source {path_text} cannot be read as HDF5 ({exc})") from exc
    if len(shape) != 3:
        raise InputError(f"source {path_text}:{dataset} has shape {shape}; expected a [z, y, x] stack")

    def read(z_start: int, z_stop: int) -> np.ndarray:
        with h5py.File(path_text, "r") as f:
            return f[dataset][z_start:z_stop]

    return StackSource(f"{path_text}:{dataset}", shape, dtype, read)  # type: ignore[arg-type]


def _open_multipage_tiff(path: Path) -> StackSource:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error on bad files
        raise InputError(f"source {path} is not a readable TIFF ({exc})") from exc
    with tif, _tifffile_errors() as errors:
        pages = tif.pages
        count = len(pages)  # walks every page's IFD: a chain cut short only logs an error
        if errors:
            raise InputError(f"source {path} is truncated or damaged: {errors[0]} after page {count - 1}; "
                             "expected a complete multi-page TIFF (copy it again)")
        first = pages[0]
        shape = (len(pages), *first.shape[:2])
        dtype = first.dtype
        for i, page in enumerate(pages):
            _require_grey_tiff_page(page, f"source {path}: page {i}")
            _require_whole_tiff_page(page, path, f"source {path}: page {i}")
            if page.shape[:2] != first.shape[:2]:
                raise InputError(f"source {path}: page {i} is {page.shape[:2]}, page 0 is {first.shape[:2]}; expected equal sizes")

    def read(z_start: int, z_stop: int) -> np.ndarray:
        return tifffile.imread(path, key=range(z_start, z_stop)).reshape(z_stop - z_start, *shape[1:])

    return StackSource(str(path), shape, dtype, read)  # type: ignore[arg-type]


def _section_shape_and_dtype(path: Path) -> tuple[tuple[int, int], np.dtype]:
    """Read a section's header only (PIL decodes lazily), so checking 10,000 sections is cheap."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise InputError(f"section {path} is not a readable TIFF ({exc})") from exc
        with tif:
            page = tif.pages[0]
            _require_grey_tiff_page(page, f"section {path}")
            _require_whole_tiff_page(page, path, f"section {path}")
            return tuple(page.shape[:2]), page.dtype  # type: ignore[return-value]
    from PIL import Image

    if path.suffix.lower() == ".png":
        _require_whole_png(path)
    try:
        with Image.open(path) as image:
            if image.mode == "P":
                _grey_palette(image, path)  # raises unless every palette entry is grey
            if image.mode not in _MODE_DTYPES:
                raise InputError(f"section {path} has color mode {image.mode}; expected a grayscale image")
            return (image.height, image.width), np.dtype(_MODE_DTYPES[image.mode])
    except OSError as exc:
        raise InputError(f"section {path} is not a readable image ({exc})") from exc


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _require_whole_png(path: Path) -> None:
    """Walk a PNG's chunk lengths up to IEND by seeking, without decompressing any pixels: a
    truncated file (the usual damage from an interrupted copy) fails here, before ingest writes
    anything, for the cost of a few reads per section."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            raise InputError(f"section {path} is not a PNG file (bad signature); expected a grayscale PNG")
        at = 8
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"section {path} is truncated: its PNG chunks stop at byte {at} of {size} "
                                 "before the end marker (IEND); expected a complete image (copy it again)")
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            at += 12 + length
            if at > size:
                raise InputError(f"section {path} is truncated: its {kind.decode('latin-1')} chunk ends at byte "
                                 f"{at} but the file has {size}; expected a complete image (copy it again)")
            if kind == b"IEND":
                return
            f.seek(at)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors():
    """tifffile logs, rather than raises, when a page chain points past the end of the file and
    then reports fewer pages; collect those messages so that a cut-off stack is refused."""
    logger = logging.getLogger("tifffile")
    handler = _Collect()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _require_whole_tiff_page(page, path: Path, what: str) -> None:
    """Every strip or tile of a TIFF page must lie inside the file (a truncated TIFF still has a
    readable header when its pixel data is cut off)."""
    size = os.path.getsize(path)
    ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts)]
    if any(n == 0 for n in page.databytecounts) or (ends and max(ends) > size):
        raise InputError(f"{what} is truncated: its pixel data runs to byte {max(ends, default=0)} but the file has "
                         f"{size}; expected a complete image (copy it again)")


_MODE_DTYPES = {"L": np.uint8, "P": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}


def _require_grey_tiff_page(page, what: str) -> None:
    samples = int(getattr(page, "samplesperpixel", 1) or 1)
    if samples > 1 or len(page.shape) > 2:
        raise InputError(f"{what} has {samples} samples per pixel (shape {tuple(page.shape)}, e.g. RGB); "
                         "expected a grayscale image (one sample per pixel)")


def _grey_palette(image, path) -> np.ndarray:
    """The grey level of each palette index of a palette ("P") image; InputError if any palette
    entry has colour (r, g, b not equal): a colour image has no single grey value per pixel."""
    palette = np.asarray(image.getpalette("RGB") or [], dtype=np.uint8)
    palette = palette[: len(palette) // 3 * 3].reshape(-1, 3)
    if len(palette) == 0:
        raise InputError(f"section {path} is a palette image without a palette; expected a grayscale image")
    if not (palette == palette[:, :1]).all():
        raise InputError(f"section {path} is a colour palette image; expected a grayscale image "
                         "(a palette image is accepted only when every palette entry is grey)")
    lut = np.zeros(256, dtype=np.uint8)
    lut[: len(palette)] = palette[:256, 0]
    return lut


def _read_section(name: str) -> np.ndarray:
    """One section as a 2-D array, or InputError naming the file when its pixels do not decode."""
    try:
        return _decode_section(name)
    except InputError:
        raise
    except Exception as exc:  # PIL/imageio/tifffile raise OSError, ValueError, SyntaxError, zlib.error ...
        raise InputError(f"section {name} cannot be decoded ({type(exc).__name__}: {exc}); "
                         "expected a complete, readable image") from exc


def _decode_section(name: str) -> np.ndarray:
    """One section as a 2-D array; grey palette PNGs become their grey levels."""
    if name.lower().endswith(".png"):
        from PIL import Image

        with Image.open(name) as image:
            if image.mode == "P":
                return _grey_palette(image, name)[np.asarray(image)]
    import imageio.v3 as iio

    return np.asarray(iio.imread(name))


def _open_section_folder(folder: Path) -> StackSource:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SECTION_SUFFIXES)
    if not files:
        raise InputError(f"source folder {folder} has no .png/.tif sections")
    shape0, dtype0 = _section_shape_and_dtype(files[0])
    for path in files[1:]:
        shape, dtype = _section_shape_and_dtype(path)
        if shape != shape0:
            raise InputError(f"section {path} is {shape[1]}x{shape[0]} pixels, {files[0].name} is {shape0[1]}x{shape0[0]}; expected all sections the same size")
        if dtype != dtype0:
            raise InputError(f"section {path} has dtype {dtype}, {files[0].name} has {dtype0}; expected one dtype")
    names = [str(p) for p in files]

    def read(z_start: int, z_stop: int) -> np.ndarray:
        return np.stack([_read_section(name) for name in names[z_start:z_stop]])

    return StackSource(str(folder), (len(files), *shape0), dtype0, read)  # type: ignore[arg-type]


def check_labels(source: StackSource, slab_depth: int = 64) -> None:
    """Segmentation sources must hold non-negative integers; scan signed ones for negatives."""
    if not np.issubdtype(source.dtype, np.integer):
        raise InputError(f"source {source.description} has dtype {source.dtype}; segmentation labels must be integers")
    if np.issubdtype(source.dtype, np.signedinteger):
        for z in range(0, source.shape[0], slab_depth):
            slab = source.read_slab(z, min(source.shape[0], z + slab_depth))
            if slab.size and slab.min() < 0:
                raise InputError(f"source {source.description} has negative labels (min {slab.min()} near z={z}); expected labels >= 0")
