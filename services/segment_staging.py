"""The staging area of a segmentation run: its manifest, its grid, and per-task files written
with a completion marker.

Read boxes of neighbouring subvolumes overlap, so inference cannot write into shared chunks of
a layer: every task writes its own file under the staging folder instead, through the run's
`ArtifactStore` (precomputed/store.py), so a file counts only once its `.done` marker vouches
for it. Staging is a URL: a shared filesystem (Lustre, DAOS's POSIX interface) or an object store.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from exaconnect.errors import InputError, LayerError
from exaconnect.ffn.config import SEED_ORDERS
from exaconnect.precomputed.bbox import Box, GridCell, Triple, chunk_grid
from exaconnect.precomputed.layers import layer_url
from exaconnect.precomputed.store import ArtifactStore
from exaconnect.precomputed.stitching import MatchOptions

MANIFEST = "segment.json"


@dataclass(frozen=True)
class SegmentGrid:
    """Subvolumes of a run: `chunk_grid` cells of `subvolume` voxels with `overlap` on each side."""

    bounds: Box
    subvolume: Triple
    overlap: Triple

    def cells(self) -> list[GridCell]:
        return list(chunk_grid(self.bounds, self.subvolume, self.overlap))

    @property
    def shape(self) -> Triple:
        return tuple(-(-s // v) for s, v in zip(self.bounds.shape, self.subvolume))  # type: ignore[return-value]

    def contains(self, index) -> bool:
        return all(0 <= i < n for i, n in zip(index, self.shape))

    def task_number(self, index) -> int:
        """Grid cell -> 0..N-1 (x fastest); the high bits of every ID the cell produces."""
        if not self.contains(index):
            raise InputError(f"grid index {tuple(index)} is outside the grid {self.shape}")
        gx, gy, _ = self.shape
        x, y, z = (int(i) for i in index)
        return x + gx * (y + gy * z)

    def cell(self, index) -> GridCell:
        index = tuple(int(i) for i in index)
        if not self.contains(index):
            raise InputError(f"grid index {index} is outside the grid {self.shape}")
        start = tuple(b + i * s for b, i, s in zip(self.bounds.start, index, self.subvolume))
        write = Box(start, tuple(a + s for a, s in zip(start, self.subvolume))).intersection(self.bounds)  # type: ignore[arg-type]
        return GridCell(index, write, write.grow(self.overlap).intersection(self.bounds))  # type: ignore[arg-type]

    def forward_neighbors(self, index) -> list[Triple]:
        """The +x, +y, +z neighbours that exist: each face is handled once, by its lower cell."""
        out = []
        for axis in range(3):
            other = list(index)
            other[axis] += 1
            if self.contains(other):
                out.append(tuple(other))
        return out  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"bounds": self.bounds.to_list(), "subvolume": list(self.subvolume), "overlap": list(self.overlap)}

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentGrid":
        return cls(Box.from_list(data["bounds"]), tuple(data["subvolume"]), tuple(data["overlap"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class PassSpec:
    """One FFN pass over every subvolume. A refinement pass names `consensus_with`, the pass
    it is combined with by oversegmentation consensus (google/ffn's split consensus), so a
    merge made by either pass is cut by the other."""

    name: str
    model: str
    inference: dict = field(default_factory=dict)  # InferenceOptions overrides
    seed_order: str = "forward"
    consensus_with: str | None = None
    consensus_min_size: int = 0

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"--pass-name {self.name!r}: expected letters, digits, '-' or '_'")
        if self.seed_order not in SEED_ORDERS:
            raise InputError(f"--seed-order {self.seed_order!r}: expected one of {SEED_ORDERS}")
        if self.consensus_with == self.name:
            raise InputError(f"pass {self.name!r} cannot be combined with itself")


@dataclass(frozen=True)
class SegmentRun:
    """Everything a task of the run needs besides its grid index; stored once in staging."""

    image_layer: str
    segmentation_layer: str
    staging: str
    grid: SegmentGrid
    match: MatchOptions = MatchOptions()
    passes: tuple[PassSpec, ...] = ()

    def pass_spec(self, name: str) -> PassSpec:
        for spec in self.passes:
            if spec.name == name:
                return spec
        raise InputError(f"pass {name!r} is not part of the run in {self.staging}; passes: {[p.name for p in self.passes]}")

    @property
    def final_pass(self) -> str:
        if not self.passes:
            raise InputError(f"run in {self.staging} has no FFN pass yet; enqueue segment first")
        return self.passes[-1].name

    def to_dict(self) -> dict:
        return {
            "image_layer": self.image_layer,
            "segmentation_layer": self.segmentation_layer,
            "staging": self.staging,
            "grid": self.grid.to_dict(),
            "match": asdict(self.match),
            "passes": [asdict(p) for p in self.passes],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentRun":
        return cls(
            image_layer=data["image_layer"],
            segmentation_layer=data["segmentation_layer"],
            staging=data["staging"],
            grid=SegmentGrid.from_dict(data["grid"]),
            match=MatchOptions(**data.get("match", {})),
            passes=tuple(PassSpec(**p) for p in data.get("passes", [])),
        )


def default_staging(segmentation_layer: str) -> str:
    """A sibling folder of the output layer, so staging never shows up inside the layer."""
    return layer_url(segmentation_layer) + ".staging"


def store(staging: str) -> ArtifactStore:
    return ArtifactStore(staging)


def save_run(run: SegmentRun) -> None:
    store(run.staging).put_json(MANIFEST, run.to_dict())


def load_run(staging: str) -> SegmentRun:
    data = store(staging).get_json(MANIFEST)
    if data is None:
        raise LayerError(f"{staging}/{MANIFEST} not found; expected the staging folder of a segment run")
    return SegmentRun.from_dict(data)


# ---------------------------------------------------------------- per-task files

def cell_name(index) -> str:
    return "_".join(str(int(i)) for i in index)


def labels_path(pass_name: str, index) -> str:
    return f"labels/{pass_name}/{cell_name(index)}.npz"


def faces_path(pass_name: str, index) -> str:
    return f"faces/{pass_name}/{cell_name(index)}.npy"


def equivalence_path(pass_name: str, which: str) -> str:
    return f"equivalence/{pass_name}/{which}.npy"


def put_complete(staging: str, path: str, data: bytes, info: dict[str, Any] | None = None) -> None:
    store(staging).put(path, data, info)


def marker(staging: str, path: str) -> dict | None:
    return store(staging).marker(path)


def get_complete(staging: str, path: str) -> bytes:
    """The bytes of a completed file; LayerError if it is absent, unfinished or corrupt."""
    return store(staging).require(path)


def is_complete(staging: str, path: str) -> bool:
    return store(staging).is_complete(path)


def encode_labels(labels: np.ndarray, read_box: Box) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=labels, read_box=np.array(read_box.to_list(), np.int64))
    return buffer.getvalue()


def read_labels(staging: str, pass_name: str, index) -> tuple[np.ndarray, Box]:
    """A finished task's local labels [z, y, x] (uint32) over its read box."""
    with np.load(io.BytesIO(get_complete(staging, labels_path(pass_name, index)))) as f:
        return f["labels"], Box.from_list(f["read_box"].tolist())


def encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def read_array(staging: str, path: str, mmap: bool = False) -> np.ndarray:
    """A completed .npy; memory-mapped on a local or shared filesystem when `mmap` (the
    equivalence map is read by every relabel task, each needing only its own slice)."""
    files = store(staging)
    local = files.local_file(path)
    if mmap and local is not None:
        done = files.marker(path)
        if done is None:
            raise LayerError(f"{staging}/{path} is not complete (no .done marker)")
        array = np.load(local, mmap_mode="r")
        # A full hash would read the whole file; size is what a torn write changes.
        if os.path.getsize(local) != done["bytes"]:
            raise LayerError(f"{staging}/{path} does not match its .done marker")
        return array
    return np.load(io.BytesIO(get_complete(staging, path)), allow_pickle=False)
