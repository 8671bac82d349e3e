"""Task-state boxes: a small JSON file the pipeline writes, shown as a neuroglancer annotation layer.

File format (UTF-8 JSON), either a bare list of tasks or an object with a resolution:

    {"resolution": [10, 10, 10],
     "tasks": [{"bbox": [x0, y0, z0, x1, y1, z1], "state": "done"}, ...]}

`bbox` is in mip-0 voxels (x, y, z; lower corner inclusive, upper exclusive), as daisy/igneous
task boxes are; `resolution` (nm) says which voxels and defaults to the first viewed layer's.
`state` is one of TASK_STATES. The server re-reads the file on every request, so a reload of
the annotation layer shows progress; `write_task_states` replaces the file atomically so a
reader never sees half a file.

The server turns the file into the precomputed annotation format (one spatial chunk holding
every box, a `state` enum property and a `color` property), which neuroglancer reads like any
other precomputed annotation source.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from exaconnect.errors import InputError

TASK_STATES = ("pending", "running", "done", "failed")
# Colours a person reads at a glance: grey waiting, yellow running, green done, red failed.
STATE_COLORS = {
    "pending": (128, 128, 128),
    "running": (255, 200, 0),
    "done": (0, 200, 0),
    "failed": (255, 0, 0),
}
ANNOTATION_SHADER = "void main() {\n  setColor(prop_color());\n}\n"

# One record: 6 float32 corners, then the properties in info order (uint8 state, rgb color),
# which together are 4 bytes, so no padding is needed to keep records 4-byte aligned.
_RECORD_DTYPE = np.dtype([("geometry", "<f4", (6,)), ("state", "u1"), ("color", "u1", (3,))])


@dataclass(frozen=True)
class TaskBox:
    bbox: tuple[int, int, int, int, int, int]
    state: str


@dataclass(frozen=True)
class TaskStates:
    tasks: tuple[TaskBox, ...]
    resolution: tuple[float, float, float] | None = None


def _parse_task(item: object, index: int, path: Path) -> TaskBox:
    if not isinstance(item, dict) or "bbox" not in item or "state" not in item:
        raise InputError(f"task file {path}: tasks[{index}] must be an object with 'bbox' and 'state'")
    bbox = item["bbox"]
    if (
        not isinstance(bbox, list)
        or len(bbox) != 6
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        raise InputError(f"task file {path}: tasks[{index}].bbox is {bbox!r}; expected [x0,y0,z0,x1,y1,z1]")
    if any(bbox[i + 3] <= bbox[i] for i in range(3)):
        raise InputError(f"task file {path}: tasks[{index}].bbox {bbox} is empty; expected x1>x0, y1>y0, z1>z0")
    state = item["state"]
    if state not in TASK_STATES:
        raise InputError(f"task file {path}: tasks[{index}].state is {state!r}; expected one of {TASK_STATES}")
    return TaskBox(bbox=tuple(int(v) for v in bbox), state=state)  # type: ignore[arg-type]


def read_task_states(path: str | os.PathLike) -> TaskStates:
    """Parse a task-state file; a file not yet written means no tasks yet (the pipeline may not have started).

    A folder is read as one small JSON record per task (`{"bbox": [...], "state": ...}`), the
    form workers write into `QUEUE/boxes/` (one file per task, so workers never contend).
    """
    path = Path(path)
    if path.is_dir():
        tasks = []
        for i, record in enumerate(sorted(path.glob("*.json"))):
            try:
                tasks.append(_parse_task(json.loads(record.read_text(encoding="utf-8")), i, record))
            except (ValueError, FileNotFoundError):
                continue  # replaced or removed between listing and reading: the next request sees it
        return TaskStates(tasks=tuple(tasks))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return TaskStates(tasks=())
    except OSError as exc:
        raise InputError(f"task file {path}: cannot be read ({exc})") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InputError(f"task file {path}: not valid JSON ({exc})") from exc
    resolution = None
    if isinstance(document, dict):
        raw_resolution = document.get("resolution")
        if raw_resolution is not None:
            if not (isinstance(raw_resolution, list) and len(raw_resolution) == 3 and min(raw_resolution) > 0):
                raise InputError(f"task file {path}: resolution {raw_resolution!r}; expected three positive nm values")
            resolution = tuple(float(v) for v in raw_resolution)
        document = document.get("tasks", [])
    if not isinstance(document, list):
        raise InputError(f"task file {path}: expected a list of tasks or {{'tasks': [...]}}")
    tasks = tuple(_parse_task(item, i, path) for i, item in enumerate(document))
    return TaskStates(tasks=tasks, resolution=resolution)  # type: ignore[arg-type]


def write_task_states(
    path: str | os.PathLike, tasks: Iterable[TaskBox], resolution: Sequence[float] | None = None
) -> None:
    """Replace the task file atomically (write a sibling temp file, then rename over)."""
    path = Path(path)
    document: dict = {"tasks": [{"bbox": list(t.bbox), "state": t.state} for t in tasks]}
    for i, task in enumerate(document["tasks"]):
        _parse_task(task, i, path)
    if resolution is not None:
        document["resolution"] = [float(v) for v in resolution]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def annotation_info(states: TaskStates, resolution: Sequence[float]) -> dict:
    """The precomputed annotation `info` for the boxes (one spatial chunk holds them all)."""
    resolution = states.resolution or tuple(resolution)
    if states.tasks:
        boxes = np.array([t.bbox for t in states.tasks], dtype=np.float64)
        lower = boxes[:, :3].min(axis=0)
        upper = boxes[:, 3:].max(axis=0)
    else:
        lower, upper = np.zeros(3), np.ones(3)
    return {
        "@type": "neuroglancer_annotations_v1",
        "dimensions": {axis: [r * 1e-9, "m"] for axis, r in zip("xyz", resolution)},
        "lower_bound": [float(v) for v in lower],
        "upper_bound": [float(v) for v in upper],
        "annotation_type": "axis_aligned_bounding_box",
        "properties": [
            {
                "id": "state",
                "type": "uint8",
                "enum_values": list(range(len(TASK_STATES))),
                "enum_labels": list(TASK_STATES),
            },
            {"id": "color", "type": "rgb"},
        ],
        "relationships": [],
        "by_id": {"key": "by_id"},
        "spatial": [
            {
                "key": "spatial0",
                "grid_shape": [1, 1, 1],
                "chunk_size": [float(max(1.0, u - l)) for l, u in zip(lower, upper)],
                "limit": max(1, len(states.tasks)),
            }
        ],
    }


def _records(tasks: Sequence[TaskBox]) -> np.ndarray:
    records = np.zeros(len(tasks), dtype=_RECORD_DTYPE)
    for i, task in enumerate(tasks):
        records[i]["geometry"] = task.bbox
        records[i]["state"] = TASK_STATES.index(task.state)
        records[i]["color"] = STATE_COLORS[task.state]
    return records


def encode_spatial_chunk(states: TaskStates) -> bytes:
    """All boxes as one spatial chunk: uint64 count, the records, then uint64 ids (= list index)."""
    count = len(states.tasks)
    ids = np.arange(count, dtype="<u8")
    return np.uint64(count).astype("<u8").tobytes() + _records(states.tasks).tobytes() + ids.tobytes()


def encode_by_id(states: TaskStates, annotation_id: int) -> bytes | None:
    """One box for the `by_id` index (the record alone: there are no relationships), None if absent."""
    if not 0 <= annotation_id < len(states.tasks):
        return None
    return _records(states.tasks[annotation_id : annotation_id + 1]).tobytes()
