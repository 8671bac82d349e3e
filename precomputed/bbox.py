"""Boxes and chunk grids in mip-0 voxel coordinates (precomputed's x, y, z order, end exclusive).

Every service splits a layer into task boxes with `chunk_grid`; overlap is handled here and
nowhere else (the daisy idea: a block has a write box and, with overlap, a larger read box).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from exaconnect.errors import InputError

Triple = tuple[int, int, int]


def parse_triple(text: str | Sequence[int], name: str, positive: bool = True) -> Triple:
    """'x,y,z' (or a sequence of three ints) -> (x, y, z); `name` is the parameter in errors."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
    else:
        parts = list(text)
    try:
        values = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise InputError(f"{name}: {text!r} is not three integers 'X,Y,Z'") from None
    if len(values) != 3:
        raise InputError(f"{name}: {text!r} has {len(values)} values; expected three 'X,Y,Z'")
    if positive and min(values) <= 0:
        raise InputError(f"{name}: {text!r} must be positive in every axis")
    return values  # type: ignore[return-value]


def parse_resolution(text: str | Sequence[float], name: str = "--resolution") -> tuple[float, float, float]:
    """'x,y,z' voxel size in nm -> three finite positive floats; `name` is the parameter in errors.

    float() accepts 'nan' and 'inf', and a NaN passes `min(values) <= 0`, so both are refused
    explicitly: a NaN resolution written into an info file breaks every reader of the layer.
    """
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise InputError(f"{name}: {text!r} is not three numbers 'X,Y,Z' (voxel size in nm)") from None
    if len(values) != 3:
        raise InputError(f"{name}: {text!r} has {len(values)} values; expected three numbers 'X,Y,Z' in nm")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{name}: {text!r} must be three finite positive numbers (voxel size in nm)")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box [start, stop) in x, y, z voxels."""

    start: Triple
    stop: Triple

    def __post_init__(self) -> None:
        if any(b < a for a, b in zip(self.start, self.stop)):
            raise InputError(f"box {self} has stop < start; expected x0,y0,z0,x1,y1,z1 with x1>=x0 etc.")

    @classmethod
    def parse(cls, text: str, name: str = "--bbox") -> "Box":
        """'x0,y0,z0,x1,y1,z1' -> Box; the form every command line uses."""
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 6:
            raise InputError(f"{name}: {text!r} has {len(parts)} values; expected six 'x0,y0,z0,x1,y1,z1'")
        try:
            v = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"{name}: {text!r} is not six integers 'x0,y0,z0,x1,y1,z1'") from None
        if any(b <= a for a, b in zip(v[:3], v[3:])):
            raise InputError(f"{name}: {text!r} is empty or inverted; expected x1>x0, y1>y0, z1>z0")
        return cls(tuple(v[:3]), tuple(v[3:]))  # type: ignore[arg-type]

    @classmethod
    def from_shape(cls, shape: Sequence[int], offset: Sequence[int] = (0, 0, 0)) -> "Box":
        start = tuple(int(o) for o in offset)
        return cls(start, tuple(int(o) + int(s) for o, s in zip(offset, shape)))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return ",".join(str(v) for v in (*self.start, *self.stop))

    @property
    def shape(self) -> Triple:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def empty(self) -> bool:
        return self.size == 0

    def slices(self) -> tuple[slice, slice, slice]:
        """Slices for cloud-volume's [x, y, z] indexing."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def intersection(self, other: "Box") -> "Box":
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop))
        return Box(start, stop)  # type: ignore[arg-type]

    def contains(self, other: "Box") -> bool:
        return all(a <= b for a, b in zip(self.start, other.start)) and all(
            a >= b for a, b in zip(self.stop, other.stop)
        )

    def grow(self, margin: Sequence[int]) -> "Box":
        return Box(
            tuple(a - m for a, m in zip(self.start, margin)),  # type: ignore[arg-type]
            tuple(b + m for b, m in zip(self.stop, margin)),  # type: ignore[arg-type]
        )

    def translate(self, offset: Sequence[int]) -> "Box":
        return Box(
            tuple(a + o for a, o in zip(self.start, offset)),  # type: ignore[arg-type]
            tuple(b + o for b, o in zip(self.stop, offset)),  # type: ignore[arg-type]
        )

    def to_list(self) -> list[int]:
        return [*self.start, *self.stop]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "Box":
        return cls(tuple(int(v) for v in values[:3]), tuple(int(v) for v in values[3:6]))  # type: ignore[arg-type]


def snap_to_grid(box: Box, chunk_size: Sequence[int], origin: Sequence[int], bounds: Box | None = None) -> Box:
    """The smallest box of whole chunks (grid anchored at `origin`) holding `box`, clipped to
    `bounds`: what a writer must cover so that it writes only whole chunk files."""
    start = tuple(o + (a - o) // c * c for a, o, c in zip(box.start, origin, chunk_size))
    stop = tuple(o - (-(b - o) // c) * c for b, o, c in zip(box.stop, origin, chunk_size))
    snapped = Box(start, stop)  # type: ignore[arg-type]
    return snapped.intersection(bounds) if bounds is not None else snapped


def chunk_boxes(region: Box, bounds: Box, chunk_size: Sequence[int]) -> Iterator[Box]:
    """The chunk files' boxes (clipped to the layer `bounds`, as precomputed names them) that
    hold any voxel of `region`; the chunk grid starts at the bounds' start (the voxel offset)."""
    region = region.intersection(bounds)
    if region.empty():
        return
    for cell in chunk_grid(snap_to_grid(region, chunk_size, bounds.start, bounds), chunk_size,
                           grid_origin=bounds.start):
        yield cell.write


def require_inside(box: Box, bounds: Box, what: str) -> None:
    """Raise if `box` pokes out of `bounds` (e.g. a --bbox outside the layer)."""
    if not bounds.contains(box):
        raise InputError(f"{what}: box {box} is outside the layer bounds {bounds}; expected a box inside it")


@dataclass(frozen=True)
class GridCell:
    """One task's box: `write` tiles the bounds without gaps or overlap; `read` adds the overlap."""

    index: Triple
    write: Box
    read: Box


def chunk_grid(
    bounds: Box,
    task_shape: Sequence[int],
    overlap: Sequence[int] = (0, 0, 0),
    align_to: Sequence[int] | None = None,
    grid_origin: Sequence[int] | None = None,
) -> Iterator[GridCell]:
    """Split `bounds` into task boxes of `task_shape` on a grid anchored at `grid_origin`.

    `task_shape` must be a multiple of `align_to` (a layer's chunk size) so that write boxes
    never share a chunk and two tasks never write the same file. The grid origin defaults to
    the bounds' start (a layer's voxel offset), which is where precomputed chunks start too.
    Read boxes are write boxes grown by `overlap` and clipped to `bounds`.
    """
    task_shape = tuple(int(s) for s in task_shape)
    if min(task_shape) <= 0:
        raise InputError(f"task shape {task_shape} must be positive")
    if align_to is not None:
        for axis, (shape, chunk) in enumerate(zip(task_shape, align_to)):
            if shape % int(chunk):
                raise InputError(
                    f"task shape {task_shape} is not a multiple of the chunk size {tuple(align_to)} "
                    f"in axis {'xyz'[axis]}; expected chunk-aligned tasks"
                )
    origin = tuple(grid_origin) if grid_origin is not None else bounds.start
    first = [(b - o) // s for b, o, s in zip(bounds.start, origin, task_shape)]
    last = [-(-(e - o) // s) for e, o, s in zip(bounds.stop, origin, task_shape)]
    for index in itertools.product(*(range(f, l) for f, l in zip(first, last))):
        start = tuple(o + i * s for o, i, s in zip(origin, index, task_shape))
        cell = Box(start, tuple(a + s for a, s in zip(start, task_shape))).intersection(bounds)  # type: ignore[arg-type]
        if cell.empty():
            continue
        yield GridCell(
            index=tuple(index),  # type: ignore[arg-type]
            write=cell,
            read=cell.grow(overlap).intersection(bounds),
        )


_CHUNK_NAME = re.compile(r"^(-?\d+)-(-?\d+)_(-?\d+)-(-?\d+)_(-?\d+)-(-?\d+)$")


def parse_chunk_name(name: str) -> Box | None:
    """The box of a precomputed chunk file (`x0-x1_y0-y1_z0-z1`, a path or a `.json`/`.gz`
    suffix allowed); None if the name is not a chunk's. Coordinates may be negative (a layer
    whose voxel offset is below zero, as a montage's can be: `-3-13_...`)."""
    stem = name.rsplit("/", 1)[-1]
    for suffix in (".json", ".gz", ".br"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    match = _CHUNK_NAME.match(stem)
    if match is None:
        return None
    x0, x1, y0, y1, z0, z1 = (int(v) for v in match.groups())
    return Box((x0, y0, z0), (x1, y1, z1))
