"""`exaconnect segment box`: FFN inference on one box of an image layer, written into a
segmentation layer with the image's geometry. Interactive use; the queue service for whole
volumes is `services/segment` (`exaconnect segment run`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from exaconnect.errors import InputError
from exaconnect.precomputed.bbox import Box, require_inside
from exaconnect.precomputed.layers import (
    LayerSpec,
    Provenance,
    create_layer,
    layer_bounds,
    layer_url,
    open_layer,
    read_box,
    write_box,
)
from exaconnect.precomputed.verify import record_checksums


def output_spec(image_vol, dtype: str = "uint64", layer_type: str = "segmentation") -> LayerSpec:
    """A layer with the image layer's mip-0 geometry."""
    scale = image_vol.info["scales"][0]
    return LayerSpec(
        layer_type=layer_type,
        dtype=dtype,
        size=tuple(scale["size"]),  # type: ignore[arg-type]
        resolution=tuple(scale["resolution"]),  # type: ignore[arg-type]
        voxel_offset=tuple(scale["voxel_offset"]),  # type: ignore[arg-type]
        chunk_size=tuple(scale["chunk_sizes"][0]),  # type: ignore[arg-type]
    )


def segment_box(image_layer: str, out_layer: str, model: str, bbox: Box | None = None,
                options: dict[str, Any] | None = None, device: str = "auto",
                probabilities_layer: str | None = None, counters_path: str | None = None,
                progress: bool = True, fill: bool = False) -> dict:
    """Segments `bbox` of `image_layer` with the FFN `model` into a new `out_layer`; with `fill`,
    voxels the FFN left unsegmented are handed to neighbouring objects (`ffn.fill`)."""
    from exaconnect.ffn.inference import segment_subvolume
    from exaconnect.ffn.predictor import load_model

    image_layer, out_layer = layer_url(image_layer), layer_url(out_layer)
    image_vol = open_layer(image_layer, layer_type="image")
    bounds = layer_bounds(image_vol)
    box = bbox or bounds
    require_inside(box, bounds, f"--bbox for image layer {image_layer}")
    if image_vol.dtype != np.uint8:
        raise InputError(f"image layer {image_layer} is {image_vol.dtype}; the FFN takes uint8 EM")
    predictor = load_model(model, config_overrides=options or None, device=device)
    # The output layers are created (or found compatible) before the minutes of inference, so a
    # layer that cannot take the result fails now rather than after the work is done.
    parameters = {"model": str(model), "bbox": str(box), "options": options or {}, "fill_unsegmented": fill}
    provenance = Provenance("segment", parameters, [image_layer, str(model)])
    out_vol = create_layer(out_layer, output_spec(image_vol), provenance)
    prob_vol = None
    if probabilities_layer:
        prob_vol = create_layer(probabilities_layer, output_spec(image_vol, "uint8", "image"),
                                Provenance("segment-probabilities", parameters, [image_layer]))
    image = read_box(image_vol, box)
    result = segment_subvolume(image, predictor, progress=progress)
    labels = result.labels
    unsegmented = float(np.mean(labels == 0))
    if fill:
        from exaconnect.ffn.fill import fill_unsegmented

        labels = fill_unsegmented(image, labels)

    # An interactive box need not follow the chunk grid: write_box completes its edge chunks.
    write_box(out_vol, box, labels)
    record_checksums(out_vol, box)  # read back, and a manifest for `exaconnect layer verify`
    if prob_vol is not None:
        write_box(prob_vol, box, result.probabilities)
        record_checksums(prob_vol, box)
    summary = {
        "image_layer": image_layer,
        "segmentation_layer": out_layer,
        "bbox": str(box),
        "objects": len(result.objects),
        "unsegmented_fraction": round(unsegmented, 6),
        "filled": fill,
        "precision": getattr(predictor, "precision", None),
        "counters": result.counters,
    }
    if counters_path:
        Path(counters_path).write_text(json.dumps(summary, indent=1, default=str))
    return summary
