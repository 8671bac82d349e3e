"""Misalign an aligned stack on purpose, recording the truth, to measure an aligner.

Section z of the output shows, at pixel p, the original section at `truth.source_positions(z, p)`:
    T_z(p) = R(angle_z) (p - c) + c + t_z + e_z(p)
with a random translation t_z, a small rotation about the centre c and a smooth elastic field e_z
(bicubic interpolation of random control vectors). Chosen sections are blanked, contrast-inverted
or given a fold (a flat dark band, as folds and cracks look in EM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from exaconnect.errors import InputError


@dataclass(frozen=True)
class MisalignmentConfig:
    max_translation: float = 40.0  # px, per axis, uniform
    max_rotation_degrees: float = 1.5
    max_elastic: float = 5.0  # px, largest elastic displacement in a section
    # px between control vectors: distortions of EM sections vary over hundreds of pixels;
    # at 128 px a 5 px field still bends by ~4 % across a 160 px patch.
    elastic_control_spacing: int = 128
    blank_sections: tuple[int, ...] = ()
    inverted_sections: tuple[int, ...] = ()
    fold_sections: tuple[int, ...] = ()
    fold_width: int = 8

    def __post_init__(self) -> None:
        if self.max_translation < 0 or self.max_elastic < 0 or self.elastic_control_spacing < 8:
            raise InputError(f"perturbation {self}: expected non-negative sizes and control spacing >= 8")


@dataclass
class Truth:
    """The recorded perturbation; `source_positions` evaluates it anywhere."""

    shape: tuple[int, int]
    translations: np.ndarray  # [z, 2] (dy, dx)
    angles: np.ndarray  # [z] radians
    elastic: np.ndarray  # [z, gy, gx, 2] control vectors
    control_spacing: int
    blank: tuple[int, ...] = ()
    inverted: tuple[int, ...] = ()
    folded: tuple[int, ...] = ()
    fold_masks: dict = field(default_factory=dict)

    @property
    def center(self) -> np.ndarray:
        return (np.array(self.shape, float) - 1) / 2

    def source_positions(self, z: int, points: np.ndarray) -> np.ndarray:
        """Original-section positions [..., 2] shown at misaligned-section pixels `points`."""
        points = np.asarray(points, float)
        c = self.center
        a = self.angles[z]
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        rigid = (points - c) @ rot.T + c + self.translations[z]
        coords = [points[..., 0] / self.control_spacing, points[..., 1] / self.control_spacing]
        e = np.stack([ndimage.map_coordinates(self.elastic[z, ..., k], coords, order=3, mode="nearest") for k in range(2)], axis=-1)
        return rigid + e

    @property
    def bad_sections(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.blank) | set(self.inverted) | set(self.folded)))


def random_truth(num_sections: int, shape: tuple[int, int], config: MisalignmentConfig, seed: int) -> Truth:
    rng = np.random.default_rng(seed)
    translations = rng.uniform(-config.max_translation, config.max_translation, (num_sections, 2))
    angles = np.radians(rng.uniform(-config.max_rotation_degrees, config.max_rotation_degrees, num_sections))
    gy = -(-(shape[0] - 1) // config.elastic_control_spacing) + 1
    gx = -(-(shape[1] - 1) // config.elastic_control_spacing) + 1
    elastic = rng.normal(size=(num_sections, gy, gx, 2))
    elastic -= elastic.mean(axis=(1, 2), keepdims=True)  # the rigid part is t_z's job
    peak = np.linalg.norm(elastic, axis=-1).max(axis=(1, 2))
    scale = rng.uniform(0.5, 1.0, num_sections) * config.max_elastic / np.maximum(peak, 1e-9)
    elastic *= scale[:, None, None, None]
    return Truth(shape, translations, angles, elastic, config.elastic_control_spacing,
                 tuple(config.blank_sections), tuple(config.inverted_sections), tuple(config.fold_sections))


def misalign_stack(image_zyx: np.ndarray, config: MisalignmentConfig = MisalignmentConfig(), seed: int = 0) -> tuple[np.ndarray, Truth]:
    """(misaligned uint8 stack, truth). Pixels that come from outside the original are 0."""
    if image_zyx.ndim != 3:
        raise InputError(f"misalign: array of shape {image_zyx.shape}; expected [z, y, x]")
    nz, ny, nx = image_zyx.shape
    for name, sections in (("blank", config.blank_sections), ("inverted", config.inverted_sections),
                           ("fold", config.fold_sections)):
        if any(not 0 <= z < nz for z in sections):
            raise InputError(f"misalign: {name} sections {sections} outside 0..{nz - 1}")
    truth = random_truth(nz, (ny, nx), config, seed)
    rng = np.random.default_rng(seed + 1)
    yy, xx = np.meshgrid(np.arange(ny, dtype=float), np.arange(nx, dtype=float), indexing="ij")
    points = np.stack([yy, xx], axis=-1)
    out = np.zeros_like(image_zyx, dtype=np.uint8)
    for z in range(nz):
        src = truth.source_positions(z, points)
        warped = ndimage.map_coordinates(image_zyx[z].astype(np.float32), [src[..., 0], src[..., 1]], order=3,
                                         mode="constant", cval=0.0)
        inside = (src[..., 0] >= 0) & (src[..., 0] <= ny - 1) & (src[..., 1] >= 0) & (src[..., 1] <= nx - 1)
        section = np.where(inside, np.clip(np.rint(warped), 1, 255), 0)
        if z in config.inverted_sections:
            section = np.where(inside, 256 - section, 0)
        if z in config.fold_sections:
            # A fold: a straight dark band at a random angle through the middle third.
            angle = rng.uniform(0, np.pi)
            offset = rng.uniform(-ny / 6, ny / 6)
            distance = (yy - ny / 2) * np.cos(angle) - (xx - nx / 2) * np.sin(angle) - offset
            band = np.abs(distance) < config.fold_width / 2
            section = np.where(band & inside, 12, section)
            truth.fold_masks[z] = band
        if z in config.blank_sections:
            section = np.zeros_like(section)
        out[z] = section.astype(np.uint8)
    return out, truth


def misalign_sample(image_zyx: np.ndarray, seed: int = 0) -> tuple[np.ndarray, Truth]:
    """The demo's misalignment: translations of up to a tenth of the section (at most 40 px),
    up to 1 degree of rotation and elastic distortion of up to 2 % of the section (at most 5 px),
    no bad sections (the demo goes on to segment the result)."""
    side = min(image_zyx.shape[1:])
    config = MisalignmentConfig(max_translation=min(40.0, side / 10), max_rotation_degrees=1.0,
                           max_elastic=min(5.0, side / 50), elastic_control_spacing=max(32, side // 2))
    return misalign_stack(image_zyx, config, seed)
