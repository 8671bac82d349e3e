"""Chunk files of a precomputed layer: their names, a structural check of their bytes made before
any C decoder sees them, and the guard that puts that check in front of every cloud-volume read.

Why a check before decoding: the compressed_segmentation and compresso decoders trust the
offsets stored in the chunk. A truncated compressed_segmentation chunk decodes without error into
wrong labels (its last blocks read past the end of the buffer), and random bytes make both
decoders segfault, which kills a worker without a Python traceback. Every offset and every
lookup-table index is checked here against the buffer's length first, so the decoder then reads
only memory inside the buffer, and a damaged chunk raises `DamagedChunkError` naming its file.
compresso's body cannot be checked short of decoding it: a compresso chunk that no checksum
manifest vouches for is decoded in a helper process instead (`isolated_decode`).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Sequence

import numpy as np

from exaconnect.errors import LayerError

# compressed_segmentation stores each block's values with one of these bit widths (neuroglancer's
# `sliceview/compressed_segmentation` spec); anything else is a damaged header.
_CSEG_BITS = (0, 1, 2, 4, 8, 16, 32)


class DamagedChunkError(LayerError):
    """A chunk file whose bytes cannot be the encoding the layer's info declares."""


class MissingChunkError(LayerError):
    """A chunk file that should exist (inside the layer's bounds) and does not."""


def compressed_segmentation_problem(data: bytes | memoryview, shape: Sequence[int], dtype: Any,
                                    block_size: Sequence[int]) -> str:
    """'' when `data` is a well-formed compressed_segmentation chunk of `shape` (x, y, z[, c]),
    else what is wrong with it.

    The format (one channel after another): a uint32 offset per channel, then per channel a
    64-bit header per block (24-bit lookup-table offset, 8-bit bit width, 32-bit offset of the
    packed values; offsets in uint32 words from the channel's start), the packed values and the
    lookup tables. An encoder writes nothing else, so the furthest byte any block uses must be the
    channel's last: a chunk truncated, or extended, by even one word fails that test.
    """
    shape = [int(s) for s in shape]
    channels = shape[3] if len(shape) > 3 else 1
    if len(data) % 4:
        return f"{len(data)} bytes is not a whole number of 32-bit words"
    words = np.frombuffer(data, dtype="<u4")
    if len(words) < channels:
        return f"{len(data)} bytes is too short for {channels} channel offset(s)"
    per_entry = 2 if np.dtype(dtype).itemsize == 8 else 1
    block = np.asarray([int(b) for b in block_size], dtype=np.int64)
    grid = -(-np.asarray(shape[:3], dtype=np.int64) // block)
    nblocks = int(np.prod(grid))
    block_voxels = int(np.prod(block))
    offsets = words[:channels].astype(np.int64)
    for c in range(channels):
        start = int(offsets[c])
        end = int(offsets[c + 1]) if c + 1 < channels else len(words)
        if not channels <= start <= end <= len(words):
            return f"channel {c} offset {start} is outside the {len(words)}-word chunk"
        problem = _channel_problem(words[start:end], nblocks, block_voxels, per_entry)
        if problem:
            return f"channel {c}: {problem}"
    return ""


def _channel_problem(channel: np.ndarray, nblocks: int, block_voxels: int, per_entry: int) -> str:
    length = len(channel)
    if length < 2 * nblocks:
        return f"{length} words cannot hold the headers of {nblocks} blocks"
    header = channel[: 2 * nblocks].reshape(nblocks, 2).astype(np.int64)
    table = header[:, 0] & 0xFFFFFF
    bits = header[:, 0] >> 24
    values_at = header[:, 1]
    bad = ~np.isin(bits, _CSEG_BITS)
    if bad.any():
        i = int(np.argmax(bad))
        return f"block {i} has bit width {int(bits[i])}; expected one of {_CSEG_BITS}"
    value_words = -(-(block_voxels * bits) // 32)
    values_end = np.where(bits > 0, values_at + value_words, 0)
    if (values_end > length).any() or ((bits > 0) & (values_at < 2 * nblocks)).any():
        i = int(np.argmax((values_end > length) | ((bits > 0) & (values_at < 2 * nblocks))))
        return f"block {i}'s packed values ({int(values_at[i])}..{int(values_end[i])}) lie outside 0..{length} words"
    # A block's table ends between table + 1 entry and table + 2**bits entries. Only blocks whose
    # upper end could pass the channel's end, or be its last word, need their values unpacked to
    # find the real end: on FIB-25 labels that is 0-1 of a chunk's 512 blocks, so the check costs
    # well under one decode.
    upper = table + (np.left_shift(1, bits)) * per_entry
    lower_end = max(int(values_end.max(initial=0)), int((table + per_entry).max(initial=0)))
    unpack = (bits > 0) & (upper > lower_end)
    largest = np.where(bits > 0, np.left_shift(1, bits) - 1, 0)
    largest[unpack] = 0
    for b in np.unique(bits[unpack]):
        b = int(b)
        rows = np.flatnonzero(unpack & (bits == b))
        nwords = block_voxels * b // 32 if block_voxels * b % 32 == 0 else -(-block_voxels * b // 32)
        packed = channel[values_at[rows, None] + np.arange(nwords)[None, :]].astype(np.uint64)
        per_word = 32 // b
        shifts = (np.arange(per_word, dtype=np.uint64) * np.uint64(b))[None, None, :]
        unpacked = (packed[:, :, None] >> shifts) & np.uint64((1 << b) - 1)
        unpacked = unpacked.reshape(len(rows), -1)[:, :block_voxels]
        largest[rows] = unpacked.max(axis=1).astype(np.int64)
    table_end = table + (largest + 1) * per_entry
    if (table_end > length).any() or (table < 2 * nblocks).any():
        i = int(np.argmax((table_end > length) | (table < 2 * nblocks)))
        return (f"block {i}'s lookup table ({int(table[i])}..{int(table_end[i])}) lies outside "
                f"{2 * nblocks}..{length} words (truncated?)")
    used = int(max(values_end.max(initial=0), table_end.max(initial=0)))
    if used != length:
        return f"blocks end at word {used} but the channel has {length} words (truncated or extended)"
    return ""


def chunk_problem(data: bytes | memoryview, encoding: str, shape: Sequence[int], dtype: Any,
                  block_size: Sequence[int] | None = None) -> str:
    """'' when `data` can be decoded safely as a chunk of `shape` (x, y, z, channels), else why not.

    compressed_segmentation is checked completely; raw by its length; compresso by its header and
    declared sizes only (its decoder can still crash on a damaged body: the chunk guard decodes
    compresso chunks that no checksum vouches for in a helper process, `isolated_decode`);
    jpeg/png decoders raise on bad bytes by themselves.
    """
    if encoding == "compressed_segmentation":
        return compressed_segmentation_problem(data, shape, dtype, block_size or (8, 8, 8))
    if encoding == "raw":
        dims = tuple(int(s) for s in shape)  # cloud-volume passes numpy integers: name them plainly
        expected = int(np.prod(dims)) * np.dtype(dtype).itemsize
        if len(data) != expected:
            return f"{len(data)} bytes; a raw {np.dtype(dtype).name} chunk of {dims} has {expected}"
        return ""
    if encoding == "compresso":
        import compresso

        raw = bytes(data)
        if not compresso.valid(raw):
            return "not a compresso stream (bad magic or header)"
        try:
            head = compresso.header(raw)
            size = (int(head["sx"]), int(head["sy"]), int(head["sz"]))
        except Exception as exc:  # a header the library cannot parse
            return f"unreadable compresso header ({exc})"
        if size != tuple(int(s) for s in shape[:3]):
            return f"compresso header says {size}; the chunk is {tuple(int(s) for s in shape[:3])}"
        if int(head["data_width"]) != np.dtype(dtype).itemsize:
            return f"compresso header says {head['data_width']}-byte labels; the layer is {np.dtype(dtype).name}"
    return ""


_installed = threading.Lock()
_state = {"installed": False}


def install_chunk_guard() -> None:
    """Check every chunk cloud-volume decodes, in this process, before its decoder runs.

    cloud-volume funnels every chunk it decodes (ours and igneous's tasks' reads alike) through
    `rx._decode_helper(fn, meta, filename, content, fill_missing, mip, ...)`, the one place
    that knows the chunk's file name, so the check wraps that function. Idempotent.
    """
    with _installed:
        if _state["installed"]:
            return
        from cloudvolume.datasource.precomputed.image import rx

        original = rx._decode_helper

        @functools.wraps(original)
        def checked(fn, meta, input_bbox, content, fill_missing, mip, background_color=0,
                    allow_none=True, encoding=None):
            if content is not None and not isinstance(content, np.ndarray) and len(content) > 0:
                from cloudvolume.lib import Bbox

                enc = encoding or meta.encoding(mip)
                shape = [*Bbox.create(input_bbox).size3(), meta.num_channels]
                block = meta.compressed_segmentation_block_size(mip) or (8, 8, 8)
                problem = chunk_problem(content, enc, shape, meta.dtype, block)
                vouched = False
                if not problem:
                    from exaconnect.precomputed.checksums import check_chunk_status

                    problem, vouched = check_chunk_status(meta.cloudpath, str(input_bbox), content)
                if problem:
                    raise DamagedChunkError(f"chunk {meta.cloudpath}/{input_bbox} is damaged: {problem}; "
                                            "rewrite it (rerun the task that wrote it)")
                if enc == "compresso" and not vouched:
                    # Only the header was checked: decode in the helper process, where a garbled
                    # body can crash nothing but the helper. What cloud-volume then gets is the
                    # decoded array, which every one of its decode functions takes as "raw".
                    from exaconnect.precomputed.isolated_decode import decode_compresso_isolated

                    content = decode_compresso_isolated(content, shape, meta.dtype, f"{meta.cloudpath}/{input_bbox}")
                    encoding = "raw"
            elif not fill_missing and not isinstance(content, np.ndarray):
                raise MissingChunkError(f"chunk {meta.cloudpath}/{input_bbox} is missing or empty; expected a "
                                        "complete input layer (rerun the stage that writes it, or allow missing chunks)")
            try:
                return original(fn, meta, input_bbox, content, fill_missing, mip, background_color=background_color,
                                allow_none=allow_none, encoding=encoding)
            except LayerError:
                raise
            except Exception as exc:
                from cloudvolume.exceptions import EmptyVolumeException

                if isinstance(exc, EmptyVolumeException):
                    raise
                raise DamagedChunkError(f"chunk {meta.cloudpath}/{input_bbox} cannot be decoded: {exc}") from exc

        rx._decode_helper = checked
        rx.decode_binary_image = _isolating_binary_decode(rx.decode_binary_image, checked)
        rx.download_chunk = _naming_decompression_errors(rx.download_chunk)
        _state["installed"] = True


def _isolating_binary_decode(decode_binary_image, decode_helper):
    """cloud-volume's label-mask download asks compresso whether a chunk contains the label
    before `_decode_helper` runs, which reads the chunk body in this process: decode such
    chunks through the guarded helper first (isolated unless a checksum vouches for them)."""

    @functools.wraps(decode_binary_image)
    def binary(label, meta, input_bbox, content, fill_missing, mip, background_color=0, allow_none=True,
               encoding=None):
        enc = encoding or meta.encoding(mip)
        if enc != "compresso" or content is None or isinstance(content, np.ndarray) or len(content) == 0:
            return decode_binary_image(label, meta, input_bbox, content, fill_missing, mip,
                                       background_color=background_color, allow_none=allow_none, encoding=encoding)
        from cloudvolume import chunks as cv_chunks

        image = decode_helper(cv_chunks.decode, meta, input_bbox, content, fill_missing, mip,
                              background_color=background_color, allow_none=False, encoding=enc)
        mask = np.asarray(image) == label
        return None if allow_none and not mask.any() else mask

    return binary


def decompression_errors() -> tuple[type[BaseException], ...]:
    """What the codecs behind cloudfiles raise on a damaged gzip/brotli/zstd stream (a truncated
    or garbled chunk stored compressed, as on object stores)."""
    import gzip
    import zlib

    from cloudfiles.exceptions import DecompressionError

    errors: list[type[BaseException]] = [DecompressionError, zlib.error, gzip.BadGzipFile, EOFError]
    for module, name in (("deflate", "DeflateError"), ("brotli", "error"), ("zstandard", "ZstdError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _naming_decompression_errors(download_chunk):
    """cloud-volume decompresses a chunk before `_decode_helper` sees it, and the codec's error
    (`DeflateError: Decompression failed`) names no file: name it here."""
    errors = decompression_errors()

    @functools.wraps(download_chunk)
    def download(meta, cache, lru, lru_encoding, cloudpath, mip, filename, *args, **kwargs):
        try:
            return download_chunk(meta, cache, lru, lru_encoding, cloudpath, mip, filename, *args, **kwargs)
        except LayerError:
            raise
        except errors as exc:
            raise DamagedChunkError(f"chunk {cloudpath}/{filename} is damaged: cannot decompress it "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                    "rewrite it (rerun the task that wrote it)") from exc

    return download
