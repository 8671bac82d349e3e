"""Movement of the FFN field of view (reference google/ffn `movement.FaceMaxMovementPolicy`).

After each evaluation the network's prediction is inspected on the six faces of the cube
+/- `deltas` around the FOV centre; on each face the voxel of highest logit is a candidate
next centre if it reaches the move threshold. Candidates are queued first-in first-out,
each evaluation's candidates in descending score order. A position whose delta-grid cell
(relative to the object's seed) has already been evaluated is skipped.
All coordinates here are (z, y, x).
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np


def face_moves(
    logits: np.ndarray, deltas: tuple[int, int, int], threshold: float
) -> list[tuple[float, tuple[int, int, int]]]:
    """(score, offset from FOV centre) for each face whose maximum reaches `threshold`.

    Sorted as the reference does: by score descending, ties by offset descending. On a face,
    the first maximum in C order wins (numpy argmax), as in the reference.
    """
    center = np.array(logits.shape) // 2
    window = [slice(c - d, c + d + 1) for c, d in zip(center, deltas)]
    found: set[tuple[float, tuple[int, int, int]]] = set()
    for axis, delta in enumerate(deltas):
        if delta == 0:
            continue
        for offset in (-delta, delta):
            face_sel = list(window)
            face_sel[axis] = center[axis] + offset
            face = logits[tuple(face_sel)]
            row, col = np.unravel_index(int(face.argmax()), face.shape)
            score = face[row, col]
            if score < threshold:
                continue
            relative = [int(row) - face.shape[0] // 2, int(col) - face.shape[1] // 2]
            relative.insert(axis, int(offset))
            found.add((score, tuple(relative)))  # type: ignore[arg-type]
    return sorted(found, reverse=True)


class FaceMaxMovement:
    """Queue of candidate FOV centres for the object being segmented."""

    def __init__(self, deltas: tuple[int, int, int], score_threshold: float):
        self.deltas = np.asarray(deltas)
        self.score_threshold = score_threshold
        self.queue: deque[tuple[float, tuple[int, int, int]]] = deque()
        self.visited: set[tuple[int, ...]] = set()
        self.start_pos = np.zeros(3, dtype=np.int64)

    def reset(self, start_pos: tuple[int, int, int]) -> None:
        self.queue = deque()
        self.visited = set()
        self.start_pos = np.asarray(start_pos)
        # The seed itself is the first position; its score only has to pass the threshold.
        self.queue.append((self.score_threshold * 2, tuple(int(v) for v in start_pos)))

    def cell(self, pos) -> tuple[int, ...]:
        """Delta-grid cell of `pos`; the seed sits in the middle of its cell, not at a corner,
        so that all directions are treated alike."""
        relative = np.asarray(pos) - self.start_pos
        return tuple(int(v) for v in (relative + self.deltas // 2) // np.maximum(self.deltas, 1))

    def candidates(self) -> Iterator[tuple[int, int, int]]:
        """Pops queued positions whose cell has not been evaluated yet (validity is the
        caller's check, done lazily at pop time as in the reference)."""
        while self.queue:
            _, pos = self.queue.popleft()
            if self.cell(pos) in self.visited:
                continue
            yield pos

    def update(self, logits: np.ndarray, pos: tuple[int, int, int]) -> None:
        """Records an evaluation at `pos` and queues the moves its prediction `logits` allows."""
        self.visited.add(self.cell(pos))
        for score, offset in face_moves(logits, tuple(int(d) for d in self.deltas), self.score_threshold):
            self.queue.append((score, tuple(int(o + p) for o, p in zip(offset, pos))))
