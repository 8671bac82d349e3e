"""A reader of neuroglancer's precomputed annotation format written from its specification
(neuroglancer's `src/datasource/precomputed/annotations.md`), for tests: our annotation layers
are encoded with neuroglancer's own `AnnotationWriter`, so reading them back with an independent
decoder checks what a client sees, not the writer against itself.

Only what our layers use: unsharded spatial-index cells and by-id files, no relationships."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Coordinates per annotation, as float32 (the rank is 3 for our layers).
_GEOMETRY_POINTS = {"point": 1, "line": 2, "axis_aligned_bounding_box": 2, "ellipsoid": 2}
# Property type -> (numpy type, element count); records keep 4-byte types first, then 2-byte,
# then 1-byte ones, and are padded to a multiple of 4 bytes.
_PROPERTY_TYPES = {"float32": ("<f4", 1), "uint32": ("<u4", 1), "int32": ("<i4", 1), "uint16": ("<u2", 1),
                   "int16": ("<i2", 1), "uint8": ("u1", 1), "int8": ("i1", 1), "rgb": ("u1", 3), "rgba": ("u1", 4)}


@dataclass(frozen=True)
class Annotation:
    id: int
    point_a: np.ndarray
    point_b: np.ndarray | None
    props: list


class PrecomputedAnnotations:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(str(path).removeprefix("file://"))
        self.info = json.loads((self.path / "info").read_text())
        if self.info.get("@type") != "neuroglancer_annotations_v1":
            raise ValueError(f"{self.path}/info: not a precomputed annotation layer")
        self.annotation_type = self.info["annotation_type"]
        self.dimensions = self.info["dimensions"]
        self.scales = [float(self.dimensions[name][0]) for name in self.dimensions]
        self.lower_bound = np.array(self.info["lower_bound"], float)
        self.upper_bound = np.array(self.info["upper_bound"], float)
        self.properties = self.info.get("properties", [])
        self.spatial = self.info["spatial"]
        if self.info.get("relationships") or self.info["by_id"].get("sharding") or any(
                level.get("sharding") for level in self.spatial):
            raise ValueError(f"{self.path}: relationships and sharded indexes are not read here")
        self._record, self._fields = self._record_layout()

    def _record_layout(self) -> tuple[np.dtype, list[str]]:
        rank = len(self.dimensions)
        fields: list[tuple] = [("geometry", "<f4", (rank * _GEOMETRY_POINTS[self.annotation_type],))]
        offset = 4 * rank * _GEOMETRY_POINTS[self.annotation_type]
        names = []
        order = sorted(range(len(self.properties)),
                       key=lambda i: -np.dtype(_PROPERTY_TYPES[self.properties[i]["type"]][0]).itemsize)
        for i in order:
            kind, count = _PROPERTY_TYPES[self.properties[i]["type"]]
            size = np.dtype(kind).itemsize
            if offset % size:
                fields.append((f"pad{offset}", "u1", (size - offset % size,)))
                offset += size - offset % size
            fields.append((self.properties[i]["id"], kind, (count,)) if count > 1 else (self.properties[i]["id"], kind))
            names.append(self.properties[i]["id"])
            offset += size * count
        if offset % 4:
            fields.append((f"pad{offset}", "u1", (4 - offset % 4,)))
        return np.dtype(fields), [p["id"] for p in self.properties]

    def _annotation(self, ident: int, record: np.void) -> Annotation:
        geometry = np.asarray(record["geometry"], float)
        rank = len(self.dimensions)
        point_b = geometry[rank:] if len(geometry) > rank else None
        props = [record[name].tolist() if np.ndim(record[name]) else record[name].item() for name in self._fields]
        return Annotation(int(ident), geometry[:rank], point_b, props)

    def spatial_cell(self, level: int, cell: tuple[int, ...]) -> list[Annotation]:
        """The annotations of one spatial-index cell: uint64 count, the records, then the uint64 ids."""
        data = (self.path / self.spatial[level]["key"] / "_".join(map(str, cell))).read_bytes()
        count = int(np.frombuffer(data[:8], "<u8")[0])
        size = self._record.itemsize
        if len(data) != 8 + count * (size + 8):
            raise ValueError(f"cell {cell}: {len(data)} bytes for {count} annotations of {size} bytes")
        records = np.frombuffer(data[8:8 + count * size], self._record)
        ids = np.frombuffer(data[8 + count * size:], "<u8")
        return [self._annotation(i, r) for i, r in zip(ids, records)]

    def by_id(self, ident: int) -> Annotation:
        data = (self.path / self.info["by_id"]["key"] / str(ident)).read_bytes()
        if len(data) != self._record.itemsize:
            raise ValueError(f"annotation {ident}: {len(data)} bytes, expected {self._record.itemsize}")
        return self._annotation(ident, np.frombuffer(data, self._record)[0])
