"""Drives several canvas generators (`Canvas.segment_all`, `Canvas.segment_at`) with one network,
batching the requests of whichever generators are waiting into one call.

`segment_subvolumes` does this for canvases it makes itself from images; refinement (P2 and P3,
ffn/reseed.py and ffn/agglomerate.py) prepares its canvases first (claimed voxels, other
objects as context), so it hands the generators in here instead. Decisions of each generator
depend only on its own logits, so the batch size changes no result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

import numpy as np

from exaconnect.errors import InputError

from .canvas import PredictRequest


@dataclass
class DriveResult:
    """What each generator returned, its network evaluations, and the seconds spent in the network."""

    returned: list[Any]
    evaluations: list[int]
    network_s: float


def drive(
    steps: Sequence[Generator[PredictRequest, np.ndarray, Any]],
    network: Callable[[np.ndarray, np.ndarray], np.ndarray],
    batch_size: int = 8,
    before_update: Callable[[int], None] | None = None,
    after_update: Callable[[int], None] | None = None,
) -> DriveResult:
    """Runs every generator to its end. `before_update(i)` / `after_update(i)` are called around
    the moment generator i receives its logits (when its canvas writes them), e.g. to count the
    voxels an update deletes."""
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: expected >= 1")
    returned: list[Any] = [None] * len(steps)
    evaluations = [0] * len(steps)
    pending: dict[int, PredictRequest] = {}
    network_s = 0.0

    def advance(index: int, logits: np.ndarray | None) -> None:
        try:
            if logits is None:
                request = next(steps[index])
            else:
                if before_update is not None:
                    before_update(index)
                request = steps[index].send(logits)
                if after_update is not None:
                    after_update(index)
        except StopIteration as stop:
            if logits is not None and after_update is not None:
                after_update(index)
            returned[index] = stop.value
            return
        pending[index] = request

    for index in range(len(steps)):
        advance(index, None)
    while pending:
        chosen = sorted(pending)[:batch_size]
        images = np.stack([pending[i].image for i in chosen])
        masks = np.stack([pending[i].mask_logits for i in chosen])
        started = time.perf_counter()
        logits = np.asarray(network(images, masks))
        network_s += time.perf_counter() - started
        for slot, index in enumerate(chosen):
            del pending[index]
            evaluations[index] += 1
            advance(index, logits[slot])
    return DriveResult(returned, evaluations, network_s)
