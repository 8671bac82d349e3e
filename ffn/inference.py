"""Public entry point: segment one subvolume (or many, batched) with a loaded FFN."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from exaconnect.errors import InputError

from .canvas import Canvas, ObjectInfo, PredictRequest
from .config import InferenceOptions
from .predictor import Predictor

logger = logging.getLogger(__name__)


@dataclass
class SubvolumeResult:
    """Output of FFN inference on one subvolume; arrays are (z, y, x)."""

    labels: np.ndarray  # uint64, 0 = unsegmented
    probabilities: np.ndarray  # uint8 quantized object probability of the label, 0 = none
    objects: list[ObjectInfo]  # id, seed (z, y, x), size, evaluations
    counters: dict[str, float] = field(default_factory=dict)


def _check_image(image: np.ndarray, predictor: Predictor) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise InputError(f"image: expected a 3-D (z, y, x) array, got {getattr(image, 'shape', type(image))}")
    fov = np.array(predictor.model_config.fov_zyx)
    if np.any(np.array(image.shape) < fov):
        raise InputError(f"image shape {image.shape} is smaller than the FFN field of view {tuple(fov)} (z, y, x)")


def _result(canvas: Canvas, network_s: float, total_s: float, evaluations: int) -> SubvolumeResult:
    counters = dict(canvas.counters)
    counters.update(
        {
            "network-evaluations": evaluations,
            "objects": len(canvas.objects),
            "time-network-s": round(network_s, 4),
            "time-other-s": round(total_s - network_s, 4),
            "time-total-s": round(total_s, 4),
        }
    )
    return SubvolumeResult(
        labels=canvas.segmentation.astype(np.uint64),
        probabilities=canvas.seg_prob,
        objects=list(canvas.objects),
        counters=counters,
    )


def segment_subvolume(
    image: np.ndarray,
    model: Predictor,
    options: InferenceOptions | None = None,
    progress: bool = False,
) -> SubvolumeResult:
    """Runs FFN inference with the reference's semantics over the whole `image` [z, y, x].

    `options` defaults to the inference options stored with the model. Their `precision`
    decides the network's numerics: a model loaded at another precision is evaluated through
    a copy at this one (`Predictor.at_precision`). `progress` logs per-subvolume progress at
    INFO level.
    """
    return segment_subvolumes([image], model, options, batch_size=1, progress=progress)[0]


def segment_subvolumes(
    images: Sequence[np.ndarray],
    model: Predictor,
    options: InferenceOptions | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[SubvolumeResult]:
    """Segments independent subvolumes, sharing batched network calls between them.

    Each subvolume runs its own canvas; whenever every active canvas has posted its next
    request, up to `batch_size` of them are evaluated in one call. Decisions depend only on
    each canvas's own logits, so results equal one-by-one runs (up to the batch-size
    dependence of the convolution's floating-point summation order, if any).
    """
    options = options or model.config.inference
    if isinstance(model, Predictor):
        # Network stand-ins (tests' oracles) have no precision to change.
        model = model.at_precision(options.precision)
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: expected >= 1")
    for image in images:
        _check_image(image, model)
    started = time.perf_counter()
    canvases = [Canvas(image, model.model_config, options) for image in images]
    steps = [canvas.segment_all() for canvas in canvases]
    pending: dict[int, PredictRequest] = {}
    network_s = [0.0] * len(canvases)
    evaluations = [0] * len(canvases)
    finished_at = [0.0] * len(canvases)
    report: Callable[[str], None] = logger.info if progress else logger.debug

    def advance(index: int, logits: np.ndarray | None) -> None:
        try:
            request = next(steps[index]) if logits is None else steps[index].send(logits)
        except StopIteration:
            finished_at[index] = time.perf_counter()
            report(f"subvolume {index}: {len(canvases[index].objects)} objects, {evaluations[index]} evaluations")
            return
        pending[index] = request

    for index in range(len(canvases)):
        advance(index, None)
    while pending:
        chosen = sorted(pending)[:batch_size]
        images_batch = np.stack([pending[i].image for i in chosen])
        masks_batch = np.stack([pending[i].mask_logits for i in chosen])
        t0 = time.perf_counter()
        logits = model(images_batch, masks_batch)
        elapsed = time.perf_counter() - t0
        for slot, index in enumerate(chosen):
            del pending[index]
            # Time of a shared call is split evenly between the canvases in it.
            network_s[index] += elapsed / len(chosen)
            evaluations[index] += 1
            if progress and evaluations[index] % 50 == 0:
                report(f"subvolume {index}: {evaluations[index]} evaluations, {len(canvases[index].objects)} objects")
            advance(index, logits[slot])
    return [
        _result(canvas, network_s[i], finished_at[i] - started, evaluations[i])
        for i, canvas in enumerate(canvases)
    ]
