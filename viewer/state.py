"""Build a neuroglancer viewer state (JSON dict) for exaconnect layers.

The state is assembled with the `neuroglancer` package's `ViewerState` so that what we emit is
what neuroglancer itself would serialise. Display defaults come from the data (see `stats`):
an `invlerp` contrast range from percentiles, the most frequent segments selected so that
their meshes show in 3D, and a position at the centre of the first layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import neuroglancer

from exaconnect.errors import InputError
from exaconnect.viewer import layers as kinds
from exaconnect.viewer.layers import LayerInfo, inspect_layer
from exaconnect.viewer.roots import DEFAULT_PORT, server_url, source_resolver, tasks_source
from exaconnect.viewer.stats import frequent_segments, intensity_range, sample_center
from exaconnect.viewer.tasks import ANNOTATION_SHADER

GRAYSCALE_SHADER = "#uicontrol invlerp normalized\nvoid main() {\n  emitGrayscale(normalized());\n}\n"
# Probabilities are absolute (0.5 means undecided), so their range is the dtype's, not a
# percentile; transparent where the network saw nothing so the EM stays visible underneath.
PROBABILITY_SHADER = (
    "#uicontrol invlerp probability\n"
    "#uicontrol float opacity slider(min=0, max=1, default=0.6)\n"
    "void main() {\n"
    "  float p = probability();\n"
    "  emitRGBA(vec4(colormapJet(p), p * opacity));\n"
    "}\n"
)
# Pixels the cross-section panel spans at the initial zoom; a 1280-px-wide window in the
# xy-3d layout gives each panel roughly this.
_PANEL_PIXELS = 500.0
_CHANNEL_NAMES = ("red", "green", "blue")
# Unit quaternion (x, y, z, w) of the initial 3D camera rotation.
_OBLIQUE = [0.2397, 0.2397, 0.0, 0.9408]

# Maps a layer to the URL neuroglancer fetches it from (e.g. through the local server).
SourceUrl = Callable[[LayerInfo], str]


def remote_source(layer: LayerInfo) -> str:
    """`precomputed://` + the layer URL: what neuroglancer reads directly (gs://, s3://, https://)."""
    return f"precomputed://{layer.url}"


def _shader_for_channels(layer: LayerInfo, sample) -> tuple[str, dict]:
    channels = min(layer.num_channels, 3)
    lines = [f"#uicontrol invlerp {name}(channel={c})" for c, name in enumerate(_CHANNEL_NAMES[:channels])]
    values = [f"{name}()" for name in _CHANNEL_NAMES[:channels]] + ["0.0"] * (3 - channels)
    shader = "\n".join(lines) + f"\nvoid main() {{\n  emitRGB(vec3({', '.join(values)}));\n}}\n"
    controls = {}
    for c, name in enumerate(_CHANNEL_NAMES[:channels]):
        channel_sample = type(sample)(data=sample.data[..., c : c + 1], mip=sample.mip)
        controls[name] = {"range": list(intensity_range(channel_sample)), "channel": [c]}
    return shader, controls


def _dtype_range(layer: LayerInfo) -> tuple[float, float]:
    dtype = layer.info["data_type"]
    if dtype.startswith("uint"):
        return 0.0, float(2 ** (8 * {"uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8}[dtype]) - 1)
    return 0.0, 1.0


def _has_color_property(layer: LayerInfo) -> bool:
    return any(p.get("id") == "color" and p.get("type") in ("rgb", "rgba") for p in layer.info.get("properties", []))


def layer_state(layer: LayerInfo, source: str, statistics: bool = True) -> neuroglancer.Layer:
    """The neuroglancer layer for one of our layers, with display defaults from its data."""
    if layer.kind == kinds.ANNOTATION:
        # A collection that carries its own colours (the montage's tile outlines: placed or only
        # at the stage position) is drawn in them; any other in neuroglancer's default colour.
        if _has_color_property(layer):
            return neuroglancer.AnnotationLayer(source=source, shader=ANNOTATION_SHADER)
        return neuroglancer.AnnotationLayer(source=source)
    if layer.kind == kinds.SEGMENTATION:
        # Meshes and skeletons are subsources that neuroglancer finds through the info's
        # `mesh` / `skeletons` keys; selecting segments is what makes them appear in 3D.
        segments = frequent_segments(sample_center(layer)) if statistics else []
        return neuroglancer.SegmentationLayer(source=source, segments=segments)
    if layer.kind == kinds.PROBABILITY:
        return neuroglancer.ImageLayer(
            source=source,
            shader=PROBABILITY_SHADER,
            shader_controls={"probability": {"range": list(_dtype_range(layer))}},
        )
    sample = sample_center(layer) if statistics else None
    if layer.num_channels > 1 and sample is not None:
        shader, controls = _shader_for_channels(layer, sample)
        return neuroglancer.ImageLayer(source=source, shader=shader, shader_controls=controls)
    contrast = intensity_range(sample) if sample is not None else _dtype_range(layer)
    return neuroglancer.ImageLayer(
        source=source, shader=GRAYSCALE_SHADER, shader_controls={"normalized": {"range": list(contrast)}}
    )


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


def viewer_state(
    layers: Sequence[LayerInfo],
    source_url: SourceUrl = remote_source,
    tasks: str | None = None,
    statistics: bool = True,
) -> neuroglancer.ViewerState:
    """A ViewerState for inspected layers; `source_url` says where the browser fetches each,
    `tasks` is the annotation source of the task boxes (none if None)."""
    if not layers:
        raise InputError("no layers given; expected at least one layer path or URL")
    first = layers[0]
    state = neuroglancer.ViewerState()
    state.title = "exaconnect"
    state.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=list(first.resolution))
    taken: set[str] = set()
    for layer in layers:
        state.layers.append(
            name=_unique_name(layer.name, taken), layer=layer_state(layer, source_url(layer), statistics)
        )
    if tasks is not None:
        state.layers.append(
            name=_unique_name("tasks", taken),
            layer=neuroglancer.AnnotationLayer(source=tasks, shader=ANNOTATION_SHADER),
        )
    extent = first.size
    # The centre voxel's centre (neuroglancer puts voxel i at [i, i+1)); a position on a voxel
    # boundary leaves it to rounding which section is shown.
    state.position = [o + s // 2 + 0.5 for o, s in zip(first.voxel_offset, first.size)]
    state.cross_section_scale = max(extent[0], extent[1]) / _PANEL_PIXELS
    state.projection_scale = 2.0 * max(extent)
    # An oblique 3D view (about 30 degrees off each axis) shows meshes as solids, not outlines.
    state.projection_orientation = _OBLIQUE
    has_segmentation = any(layer.kind == kinds.SEGMENTATION for layer in layers)
    state.layout = "xy-3d" if has_segmentation or tasks else "xy"
    # Image slices drawn into the 3D panel would hide the meshes behind an opaque plane.
    state.show_slices = not has_segmentation
    return state


def to_dict(state: neuroglancer.ViewerState) -> dict:
    """Plain JSON types (ViewerState.to_json keeps numpy scalars)."""
    return json.loads(neuroglancer.to_json_dump(state))


def build_state(
    layers: Sequence[str],
    server: str | None = None,
    tasks: bool = False,
    statistics: bool = True,
) -> dict:
    """The viewer state for layers named by path/URL, as a JSON-ready dict.

    Local layers are read by the browser through the local server at `server` (default
    `http://127.0.0.1:DEFAULT_PORT`); remote layers directly. `tasks` adds the live task-box
    annotation layer that the server publishes.
    """
    infos = [inspect_layer(layer) for layer in layers]
    origin = server or server_url("127.0.0.1", DEFAULT_PORT)
    return to_dict(viewer_state(infos, source_resolver(infos, origin), tasks_source(origin) if tasks else None, statistics))
