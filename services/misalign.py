"""Misalign: a stack misaligned on purpose, with the truth recorded (align/misalign.py), as a
queue task. The demo uses it to show alignment at work on its sample, and a lab can use it to
test the aligner on a stack of its own. Labels, when given, are moved with the image
(nearest-neighbour), so that segmentations of the aligned result can still be scored.

One task moves the whole stack: the truth is drawn per section from one random stream, and
the stacks this is meant for (a demo, a test crop) fit in memory.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
from scipy import ndimage
from taskqueue import RegisteredTask

from exaconnect.errors import InputError
from exaconnect.precomputed.layers import (LayerSpec, LayerUrl, Provenance, create_layer, layer_bounds, layer_url,
                                           open_layer, read_box, write_box)
from exaconnect.precomputed.store import ArtifactStore
from exaconnect.services.stages import Stage

TRUTH_KEY = "misalign/truth.npz"


def _config(options: dict):
    from exaconnect.align.misalign import MisalignmentConfig

    return MisalignmentConfig(max_translation=float(options["max_translation"]),
                         max_rotation_degrees=float(options["max_rotation_degrees"]),
                         max_elastic=float(options["max_elastic"]),
                         elastic_control_spacing=int(options["elastic_control_spacing"]),
                         blank_sections=tuple(int(z) for z in options.get("blank_sections", ())))


def move_labels(labels_zyx: np.ndarray, truth) -> np.ndarray:
    """Labels moved by the recorded perturbation, nearest-neighbour (never a new label)."""
    nz, ny, nx = labels_zyx.shape
    yy, xx = np.meshgrid(np.arange(ny, dtype=float), np.arange(nx, dtype=float), indexing="ij")
    points = np.stack([yy, xx], axis=-1)
    out = np.zeros_like(labels_zyx)
    for z in range(nz):
        src = truth.source_positions(z, points)
        out[z] = ndimage.map_coordinates(labels_zyx[z], [src[..., 0], src[..., 1]], order=0, mode="constant", cval=0)
    return out


class MisalignTask(RegisteredTask):
    """Misalign the image layer `src` into `dest` (and `labels_src` into `labels_dest`)."""

    def __init__(self, src: str, dest: str, options: dict, seed: int, labels_src: str | None = None,
                 labels_dest: str | None = None):
        super().__init__(src, dest, options, seed, labels_src, labels_dest)

    def execute(self) -> None:
        from exaconnect.align.misalign import misalign_stack

        src_vol = open_layer(self.src, layer_type="image")
        bounds = layer_bounds(src_vol)
        image = read_box(src_vol, bounds)
        if image.dtype != np.uint8:
            raise InputError(f"misalign: image layer {self.src} is {image.dtype}; expected uint8 EM")
        moved, truth = misalign_stack(image, _config(self.options), int(self.seed))
        write_box(open_layer(self.dest), bounds, moved)
        if self.labels_src:
            labels_vol = open_layer(self.labels_src, layer_type="segmentation")
            labels = read_box(labels_vol, layer_bounds(labels_vol))
            write_box(open_layer(self.labels_dest), layer_bounds(labels_vol), move_labels(labels, truth))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, translations=truth.translations, angles=truth.angles, elastic=truth.elastic,
                            control_spacing=np.int64(truth.control_spacing), shape=np.array(truth.shape),
                            blank=np.array(truth.blank, np.int64))
        ArtifactStore(self.dest).put(TRUTH_KEY, buffer.getvalue())


def _like(src: str, dest: str, stage: str, parameters: dict) -> None:
    vol = open_layer(src)
    bounds = layer_bounds(vol)
    scale = vol.info["scales"][0]
    spec = LayerSpec(vol.info["type"], np.dtype(vol.dtype).name, bounds.shape, tuple(scale["resolution"]),
                     bounds.start, tuple(scale["chunk_sizes"][0]))
    create_layer(dest, spec, Provenance(stage, parameters, [src]), overwrite=True)


def create_misalign_tasks(src: str, dest: str, options: dict, seed: int = 0, labels_src: str | None = None,
                          labels_dest: str | None = None) -> list[MisalignTask]:
    src, dest = layer_url(src), layer_url(dest)
    labels_src = layer_url(labels_src) if labels_src else None
    labels_dest = layer_url(labels_dest) if labels_dest else None
    bounds = layer_bounds(open_layer(src))
    side = min(bounds.shape[:2])
    options = {"elastic_control_spacing": max(32, side // 2), **options}
    _config(options)  # validate before anything is written
    depth = bounds.shape[2]
    if any(not 0 <= int(z) < depth for z in options.get("blank_sections", ())):
        raise InputError(f"misalign.blank_sections {list(options['blank_sections'])}: expected sections 0..{depth - 1}")
    _like(src, dest, "misalign", {**options, "seed": seed})
    if labels_src:
        _like(labels_src, labels_dest, "misalign", {**options, "seed": seed})
    return [MisalignTask(src, dest, options, seed, labels_src, labels_dest)]


@dataclass(frozen=True)
class MisalignStage(Stage):
    """A stack (and its labels) misaligned on purpose, the truth recorded."""

    service: ClassVar[str] = "align"
    stage_name: ClassVar[str] = "misalign"
    description: ClassVar[str] = "misalign on purpose"
    src: LayerUrl
    dest: LayerUrl
    options: Mapping[str, Any]
    seed: int = 0
    labels_src: LayerUrl | None = None
    labels_dest: LayerUrl | None = None

    def make_tasks(self) -> list:
        return create_misalign_tasks(self.src, self.dest, dict(self.options), self.seed, self.labels_src,
                                     self.labels_dest)

    def reads(self) -> tuple[str, ...]:
        return (self.src,) + ((self.labels_src,) if self.labels_src else ())

    def writes(self) -> tuple[str, ...]:
        return (self.dest,) + ((self.labels_dest,) if self.labels_dest else ())
