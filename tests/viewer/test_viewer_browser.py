"""A person's view: headless Chromium opens our server's neuroglancer on FIB-25 EM + ground truth.

The screenshot is checked pixel by pixel against what the data says it must show:
- the cross-section is textured EM (not a blank or flat panel);
- inside the selected bodies, each pixel is neuroglancer's colour for that body blended 50/50
  with the EM grey at the contrast range of the state (colours from neuroglancer's own
  `segment_colors`, so a wrong segment, wrong section or missing image layer all fail);
- the 3D panel shows shaded meshes in the colours of the selected bodies;
- the task boxes appear in their state colours.
The screenshots are kept as `artifacts/viewer_fib25.png` (served view with task boxes),
`artifacts/viewer_fib25_link.png` (a long shareable link opened on the server) and
`artifacts/viewer_fib25_short_link.png` (the short link to the saved state, the same view).
Data credit: FlyEM, HHMI Janelia Research Campus (FIB-25, CC BY).
"""

from __future__ import annotations

import colorsys
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from exaconnect.viewer.links import link, short_link
from exaconnect.viewer.server import ViewerServer
from exaconnect.viewer.tasks import STATE_COLORS, TaskBox, write_task_states

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
WINDOW = (1280, 800)
# Swiftshader on two shared cores draws the first frame in a few seconds; meshes follow.
RENDER_TIMEOUT_S = 90.0
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    # The network is closed: background services only flood the log with errors.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--force-device-scale-factor=1",
)


@pytest.fixture(scope="module")
def viewer_browser() -> Iterator[object]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile = tempfile.mkdtemp(prefix="exaconnect-chromium-")
    for flag in (*CHROME_FLAGS, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _panel_rects(browser) -> list[dict]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('.neuroglancer-rendered-data-panel'))"
        ".map(e => e.getBoundingClientRect()).map(r => ({x: r.x, y: r.y, w: r.width, h: r.height}));"
    )


def _interior_samples(labels: np.ndarray, selected: list[int], margin: int, count: int) -> list[tuple[int, int]]:
    """(x, y) voxels of the section whose (2*margin+1)^2 neighbourhood is one selected body."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(20000):
        x, y = (int(v) for v in rng.integers(margin, labels.shape[0] - margin, size=2))
        window = labels[y - margin : y + margin + 1, x - margin : x + margin + 1]
        if labels[y, x] in selected and (window == labels[y, x]).all():
            samples.append((x, y))
            if len(samples) == count:
                break
    return samples


def _measure(shot: np.ndarray, rects: list[dict], state: dict, data) -> dict:
    from neuroglancer.segment_colors import hex_string_from_segment_id

    slice_rect, view_rect = sorted(rects, key=lambda r: r["x"])[:2]
    image_layer, segmentation_layer = state["layers"][0], state["layers"][1]
    low, high = image_layer["shaderControls"]["normalized"]["range"]
    selected = [int(s) for s in segmentation_layer["segments"]]
    colors = {s: _hex_rgb(hex_string_from_segment_id(0, s)) for s in selected}
    scale = state["crossSectionScale"]
    px, py, pz = state["position"]
    z = int(pz)
    labels, em = data.segmentation_zyx[z], data.image_zyx[z].astype(np.float64)

    cx, cy = slice_rect["x"] + slice_rect["w"] / 2, slice_rect["y"] + slice_rect["h"] / 2

    def shown(x: int, y: int) -> np.ndarray:
        """The screenshot pixel at the centre of voxel (x, y) of the section."""
        sx, sy = int(round(cx + (x + 0.5 - px) / scale)), int(round(cy + (y + 0.5 - py) / scale))
        return shot[sy, sx, :3].astype(np.float64)

    def grey(x: int, y: int) -> float:
        return float(np.clip((em[y, x] - low) / (high - low), 0, 1) * 255)

    # Inside selected bodies: neuroglancer's colour for the body over the EM, 50/50.
    body_points = _interior_samples(labels, selected, margin=3, count=60)
    body_match = [np.abs(shown(x, y) - (0.5 * colors[int(labels[y, x])] + 0.5 * grey(x, y))).max() <= 12 for x, y in body_points]
    # Elsewhere (unselected bodies are transparent): the EM grey itself.
    others = [int(i) for i in np.unique(labels) if int(i) not in selected]
    em_points = _interior_samples(labels, others, margin=3, count=60)
    em_match = [np.abs(shown(x, y) - grey(x, y)).max() <= 12 for x, y in em_points]

    # EM texture, voxel to voxel: a flat (image-less) segmentation repeats colours within a body.
    rows = np.array([[shown(x, y) for x in range(16, 112)] for y in range(16, 112, 8)])
    texture = float((np.abs(np.diff(rows, axis=1)).max(axis=2) > 2).mean())

    # 3D panel: lit meshes keep their body's hue (shading scales r, g, b alike).
    x0, y0 = int(view_rect["x"]), int(view_rect["y"])
    view = shot[y0 : y0 + int(view_rect["h"]), x0 : x0 + int(view_rect["w"]), :3].reshape(-1, 3) / 255.0
    bright = view[view.max(axis=1) > 0.15]
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in bright[:: max(1, len(bright) // 20000)]]) if len(bright) else np.zeros((0, 3))
    mesh_hues = 0
    for color in colors.values():
        hue, saturation, _ = colorsys.rgb_to_hsv(*(color / 255.0))
        distance = np.minimum(np.abs(hsv[:, 0] - hue), 1 - np.abs(hsv[:, 0] - hue)) if len(hsv) else np.zeros(0)
        near = (distance < 0.01) & (np.abs(hsv[:, 1] - saturation) < 0.1) if len(hsv) else np.zeros(0, bool)
        mesh_hues += int(near.sum() >= 100)

    slice_pixels = shot[int(slice_rect["y"]) : int(slice_rect["y"] + slice_rect["h"]), int(slice_rect["x"]) : int(slice_rect["x"] + slice_rect["w"]), :3]
    box_pixels = {
        state_name: int((slice_pixels == np.array(STATE_COLORS[state_name], dtype=np.uint8)).all(axis=2).sum())
        for state_name in ("done", "running")
    }
    return {
        "segment_match": float(np.mean(body_match)) if body_match else 0.0,
        "em_match": float(np.mean(em_match)) if em_match else 0.0,
        "samples": min(len(body_match), len(em_match)),
        "texture": texture,
        "mesh_fraction": len(bright) / max(len(view), 1),
        "mesh_hues": mesh_hues,
        "boxes": box_pixels,
    }


def _good(m: dict, boxes: bool) -> bool:
    return (
        m["segment_match"] >= 0.9
        and m["em_match"] >= 0.9
        and m["texture"] >= 0.5
        and m["mesh_fraction"] >= 0.1
        and m["mesh_hues"] >= 3
        and (not boxes or min(m["boxes"].values()) >= 50)
    )


def _slice_pixels(shot: np.ndarray, rects: list[dict]) -> np.ndarray:
    r = sorted(rects, key=lambda r: r["x"])[0]
    return shot[int(r["y"]) : int(r["y"] + r["h"]), int(r["x"]) : int(r["x"] + r["w"]), :3]


def _render(browser, url: str, state: dict, data, artifact: str, boxes: bool) -> tuple[dict, list[str], list[dict]]:
    """Open `url`, screenshot until the panels show what they must and the cross-section is
    still (or time out); keep the last shot."""
    import imageio.v3 as iio

    # A fresh page load every time: from one link to another that differs only after '#', the
    # browser would not reload the page.
    browser.get("about:blank")
    browser.get(url)
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    metrics: dict = {}
    png = b""
    previous = None
    while time.monotonic() < deadline:
        time.sleep(1.0)
        rects = _panel_rects(browser)
        if len(rects) < 2:
            continue
        png = browser.get_screenshot_as_png()
        shot = iio.imread(png, extension=".png")
        metrics = _measure(shot, rects, state, data)
        now = _slice_pixels(shot, rects)
        if _good(metrics, boxes) and previous is not None and previous.shape == now.shape and (previous == now).all():
            break
        previous = now
    if png:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / artifact).write_bytes(png)
    layer_names = browser.execute_script(
        "return Array.from(document.querySelectorAll('.neuroglancer-layer-item-label')).map(e => e.textContent);"
    )
    console = browser.get_log("browser")
    print(f"{artifact} metrics:", metrics)
    for entry in console:
        print("console:", entry.get("level"), entry.get("message", "")[:500])
    metrics["slice"] = previous
    metrics["viewer_state"] = browser.execute_script("return window.viewer.state.toJSON();")
    metrics["fetched"] = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    return metrics, layer_names, console


def _assert_shows_em_segments_and_meshes(metrics: dict) -> None:
    assert metrics, "neuroglancer never laid out its two panels"
    assert metrics["samples"] >= 20, metrics
    assert metrics["texture"] >= 0.5, f"cross-section shows no EM texture: {metrics}"
    assert metrics["em_match"] >= 0.9, f"EM outside the selected bodies differs from the data: {metrics}"
    assert metrics["segment_match"] >= 0.9, f"body colours over EM differ from neuroglancer's: {metrics}"
    assert metrics["mesh_fraction"] >= 0.1 and metrics["mesh_hues"] >= 3, f"3D panel shows no meshes: {metrics}"


def test_served_viewer_shows_em_segments_meshes_and_task_boxes(viewer_fib25_layers, viewer_browser, tmp_path: Path) -> None:
    tasks_file = tmp_path / "tasks.json"
    write_task_states(
        tasks_file,
        [
            TaskBox((8, 8, 0, 56, 56, 128), "done"),
            TaskBox((72, 8, 0, 120, 56, 128), "running"),
            TaskBox((8, 72, 0, 56, 120, 128), "failed"),
        ],
    )
    data = viewer_fib25_layers
    with ViewerServer([str(data.image), str(data.segmentation)], tasks_file=tasks_file) as server:
        metrics, layer_names, _ = _render(viewer_browser, server.url, server.state, data, "viewer_fib25.png", boxes=True)
    assert layer_names == ["fib25_image", "fib25_groundtruth", "tasks"], layer_names
    _assert_shows_em_segments_and_meshes(metrics)
    assert min(metrics["boxes"].values()) >= 50, f"task boxes missing: {metrics}"


def _view_of(loaded: dict) -> dict:
    """What a person sees, from the client's own state: layers with their sources and settings, where, how."""
    keys = ("dimensions", "position", "crossSectionScale", "projectionScale", "projectionOrientation", "layout", "showSlices")
    layers = [{k: v for k, v in layer.items() if k in ("type", "source", "name", "segments", "shader", "shaderControls")}
              for layer in loaded.get("layers", [])]
    return {"layers": layers, **{k: loaded.get(k) for k in keys}}


def test_short_link_opens_the_same_view_as_the_long_one(viewer_fib25_layers, viewer_browser, tmp_path: Path) -> None:
    """`exaconnect link` (short: the state saved as JSON, `#!URL` to it) and `link --long` (state in
    the fragment), both opened on a running `exaconnect view`: the same layers, state and pixels."""
    import neuroglancer

    data = viewer_fib25_layers
    layers = [str(data.image), str(data.segmentation)]
    with ViewerServer(layers, state_dir=tmp_path) as server:
        short = short_link(layers, server=server.origin, state_dir=tmp_path)
        assert short.long_url == link(layers, server=server.origin)
        assert short.long_url.startswith(f"{server.origin}/v/exaconnect/#!%7B")
        assert short.url == f"{server.origin}/v/exaconnect/#!{server.origin}/states/{Path(short.state_location).name}"
        assert len(short.url) < 120 < len(short.long_url)
        state = neuroglancer.parse_url(short.long_url).to_json()
        long_metrics, long_names, _ = _render(viewer_browser, short.long_url, state, data, "viewer_fib25_link.png", boxes=False)
        short_metrics, short_names, console = _render(viewer_browser, short.url, state, data, "viewer_fib25_short_link.png", boxes=False)
    assert long_names == short_names == ["fib25_image", "fib25_groundtruth"], (long_names, short_names)
    _assert_shows_em_segments_and_meshes(long_metrics)
    _assert_shows_em_segments_and_meshes(short_metrics)
    assert not any("Error loading state" in entry.get("message", "") for entry in console)
    # The short link's view came from the saved file, not from the server's event stream.
    assert short.state_url in short_metrics["fetched"], short_metrics["fetched"]
    assert not any("/events/" in url and "gs=" in url for url in short_metrics["fetched"])
    # The client's own state after loading: the same view either way.
    assert _view_of(short_metrics["viewer_state"]) == _view_of(long_metrics["viewer_state"])
    assert _view_of(short_metrics["viewer_state"])["layers"][0]["source"]
    # The same pixels in the cross-section.
    long_slice, short_slice = long_metrics["slice"], short_metrics["slice"]
    assert long_slice is not None and short_slice is not None and long_slice.shape == short_slice.shape
    same = float((np.abs(long_slice.astype(int) - short_slice.astype(int)).max(axis=2) <= 2).mean())
    print("short vs long: identical cross-section pixels", same)
    assert same >= 0.99, same


def test_a_browser_reads_across_our_own_names_but_not_from_other_pages(viewer_fib25_layers, viewer_browser) -> None:
    """CORS as a real browser applies it: the client opened as localhost may read 127.0.0.1 (the
    same server), a page served from another origin (another server's port) may not."""
    data = viewer_fib25_layers
    fetch = (
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.text().then(t => done(r.status + ' ' + t.length)), e => done('refused ' + e));"
    )
    with ViewerServer([str(data.image)]) as server, ViewerServer([str(data.image)]) as other:
        target = f"{server.origin}/data/fib25_image/info"
        viewer_browser.get(f"http://localhost:{server.port}/data/fib25_image/info")
        assert viewer_browser.execute_async_script(fetch, target).startswith("200 ")
        viewer_browser.get(f"{other.origin}/data/fib25_image/info")
        assert viewer_browser.execute_async_script(fetch, target).startswith("refused")
