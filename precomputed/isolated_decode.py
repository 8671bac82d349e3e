"""Decoding compresso chunks in a helper process, so that a garbled chunk body cannot take the
caller down.

compresso's decoder trusts the window indices, component ids and locations stored in the chunk;
noise in the body makes it read far outside its buffers and segfault (exit 139, no Python
traceback, every rerun the same). Only its header can be checked cheaply beforehand
(`chunks.chunk_problem`), so chunks whose bytes no checksum manifest vouches for are decoded here:
in one long-lived helper per process (only numpy and compresso imported, started on first need),
fed one chunk at a time over a pipe. The helper decodes each chunk in a child forked from its
pristine state: what garbage does to the decoder (a crash, or not) then depends only on the
chunk, never on what the helper decoded before. A crash of that child names the chunk as
damaged; when the helper itself dies or a decode hangs, the chunk is reported damaged by name and
the next chunk gets a fresh helper.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np

# A decode of even a 512^3 uint64 chunk takes a few seconds; a helper silent for this long is
# stuck in a loop on garbage.
DECODE_TIMEOUT_SECONDS = 120.0

# The helper: length-prefixed chunks in on stdin; per chunk, a status byte, then either the
# decoded array (dtype, shape, Fortran-order bytes), an error message, or the signal that ended
# the decoding child.
_HELPER = r"""
import os, struct, sys
import numpy as np
import compresso

def read_exactly(n):
    parts = []
    while n:
        part = os.read(0, min(n, 1 << 20))
        if not part:
            sys.exit(0)
        parts.append(part)
        n -= len(part)
    return b"".join(parts)

def write_all(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]

def decode(data):
    try:
        image = np.asarray(compresso.decompress(data))
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".encode()
        write_all(b"E" + struct.pack("<Q", len(message)) + message)
        return
    dtype = image.dtype.str.encode()
    head = struct.pack("<B", len(dtype)) + dtype + struct.pack("<B", image.ndim)
    head += struct.pack(f"<{image.ndim}Q", *image.shape)
    body = np.asfortranarray(image).tobytes(order="F")
    write_all(b"K" + head + struct.pack("<Q", len(body)) + body)

while True:
    (size,) = struct.unpack("<Q", read_exactly(8))
    data = read_exactly(size)
    child = os.fork()
    if child == 0:
        decode(data)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        write_all(b"C" + struct.pack("<i", os.WTERMSIG(status)))
    elif os.WEXITSTATUS(status) != 0:
        write_all(b"C" + struct.pack("<i", 0))
"""


class HelperDied(Exception):
    """The helper ended or went silent while decoding a chunk."""


class DecoderCrashed(Exception):
    """The decoding child died on the chunk (a signal: the decoder read or wrote out of bounds)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def describe(self) -> str:
        import signal

        if not self.signum:
            return "crashed"
        try:
            return f"crashed ({signal.Signals(self.signum).name})"
        except ValueError:
            return f"crashed (signal {self.signum})"


class _Helper:
    def __init__(self) -> None:
        # Its own process group: a decoding child stuck in a loop goes with it (close()).
        self.process = subprocess.Popen([sys.executable, "-c", _HELPER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                                        start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def how_it_ended(self) -> str:
        code = self.process.poll()
        if code is None:
            return f"went silent for {DECODE_TIMEOUT_SECONDS:g} s"
        if code < 0:
            import signal

            try:
                return f"crashed ({signal.Signals(-code).name})"
            except ValueError:
                return f"crashed (signal {-code})"
        return f"exited with code {code}"

    def _read(self, n: int, deadline: float) -> bytes:
        out = bytearray()
        fd = self.process.stdout.fileno()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise HelperDied()
            part = os.read(fd, min(n - len(out), 1 << 22))
            if not part:
                raise HelperDied()
            out += part
        return bytes(out)

    def decode(self, data: bytes) -> np.ndarray | str:
        """The decoded array, or the decoder's error message; DecoderCrashed if the decoding child
        died on it, HelperDied if the helper itself ended or went silent."""
        try:
            self.process.stdin.write(struct.pack("<Q", len(data)) + data)
        except (BrokenPipeError, OSError):
            raise HelperDied() from None
        deadline = time.monotonic() + DECODE_TIMEOUT_SECONDS
        status = self._read(1, deadline)
        if status == b"C":
            (signum,) = struct.unpack("<i", self._read(4, deadline))
            raise DecoderCrashed(signum)
        if status == b"E":
            (size,) = struct.unpack("<Q", self._read(8, deadline))
            return self._read(size, deadline).decode(errors="replace")
        (dtype_len,) = struct.unpack("<B", self._read(1, deadline))
        dtype = np.dtype(self._read(dtype_len, deadline).decode())
        (ndim,) = struct.unpack("<B", self._read(1, deadline))
        shape = struct.unpack(f"<{ndim}Q", self._read(8 * ndim, deadline))
        (size,) = struct.unpack("<Q", self._read(8, deadline))
        body = self._read(size, deadline)
        return np.frombuffer(body, dtype=dtype).reshape(shape, order="F").copy(order="F")


_lock = threading.Lock()


def restart_helper() -> None:
    """End this process's helper; the next decode starts a fresh one (its own address layout)."""
    with _lock:
        helper = _helper.pop(os.getpid(), None)
        if helper is not None:
            helper.close()
_helper: dict[int, _Helper] = {}  # by pid: a forked child must not share its parent's pipes


def decode_compresso_isolated(data: bytes | memoryview, shape: Sequence[int], dtype: Any, chunk: str) -> np.ndarray:
    """`data` decoded as a compresso chunk of `shape` (x, y, z, channels) in the helper process;
    DamagedChunkError naming `chunk` when the decoder fails, crashes or hangs on it."""
    from exaconnect.precomputed.chunks import DamagedChunkError

    shape = tuple(int(s) for s in shape)
    with _lock:
        helper = _helper.get(os.getpid())
        if helper is None or not helper.alive():
            helper = _helper[os.getpid()] = _Helper()
        try:
            result = helper.decode(bytes(data))
        except DecoderCrashed as crash:
            raise DamagedChunkError(f"chunk {chunk} is damaged: the compresso decoder {crash.describe()} on it (its "
                                    "body is garbled); rewrite it (rerun the task that wrote it)") from None
        except HelperDied:
            how = helper.how_it_ended()
            helper.close()
            _helper.pop(os.getpid(), None)
            raise DamagedChunkError(f"chunk {chunk} is damaged: the compresso decoder {how} on it (its body is "
                                    "garbled); rewrite it (rerun the task that wrote it)") from None
    if isinstance(result, str):
        raise DamagedChunkError(f"chunk {chunk} is damaged: the compresso decoder refused it ({result}); "
                                "rewrite it (rerun the task that wrote it)")
    if int(np.prod(result.shape)) != int(np.prod(shape)):
        raise DamagedChunkError(f"chunk {chunk} is damaged: it decodes to {result.shape} voxels; the chunk is {shape}")
    return result.reshape(shape, order="F").astype(np.dtype(dtype), copy=False)
