"""The montage's tile outlines (services/montage.py, stage montage.outlines): a precomputed
annotation layer beside the stitched image, one box per tile per section, read back with
a decoder written from the format's specification (tests/precomputed_annotations.py); shown in the viewer state and the short link as an annotation layer;
served by `exaconnect view`."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from pathlib import Path

import neuroglancer
import numpy as np
import pytest
from precomputed_annotations import PrecomputedAnnotations
from taskqueue.registered_task import deserialize

from exaconnect.errors import LayerError
from exaconnect.montage.manifest import write_csv_manifest, write_tile
from exaconnect.montage.synthetic import TileCut, cut_tiles
from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume
from exaconnect.services import montage

ORIGIN = (37.0, 53.0)  # the sections' top-left in the layer: off the origin and off the chunk grid
FIRST_Z = 5
TILE = 44
BLANK = (1, 4)  # (section, tile in cut order): a tile with no signal, left at its stage position


@dataclass
class Stitched:
    root: Path
    layer: Path
    outlines: Path
    truth: dict[tuple[int, str], tuple[float, float]]  # (z, tile file name) -> true top-left
    stage: dict[tuple[int, str], tuple[float, float]]  # (z, tile file name) -> recorded top-left


def _run(stage) -> list:
    tasks = list(stage.make_tasks())
    for task in tasks:
        deserialize(json.dumps(task.payload())).execute()  # what a worker gets
    return tasks


@pytest.fixture(scope="module")
def stitched(tmp_path_factory: pytest.TempPathFactory) -> Stitched:
    """Two 100 x 100 sections of the built-in sample cut into 3 x 3 tiles of 44 px with stage
    positions off by up to 6 px, stitched by every montage stage (through task payloads)."""
    root = tmp_path_factory.mktemp("montage_outlines")
    (root / "tiles").mkdir()
    image, _ = synthetic_volume(SyntheticSpec(shape=(16, 100, 100), seed=4))
    rows, truth, stage = [], {}, {}
    for k in range(2):
        cut = cut_tiles(image[k], TileCut(tile_shape=(TILE, TILE), overlap=16, stage_error_px=6, noise=1, seed=k), ORIGIN)
        signal = [i for i in range(len(cut.tiles)) if (k, i) != BLANK]
        # The solve keeps the mean stage position of the tiles it places: make that the truth's.
        cut.stage_xy[signal] -= (cut.stage_xy - cut.true_xy)[signal].mean(axis=0)
        for i, (tile, xy, true_xy) in enumerate(zip(cut.tiles, cut.stage_xy, cut.true_xy)):
            name = f"z{k}_{i}.png"
            write_tile(str(root / "tiles" / name), np.zeros_like(tile) if (k, i) == BLANK else tile)
            rows.append((FIRST_Z + k, f"tiles/{name}", float(xy[0]), float(xy[1])))
            truth[FIRST_Z + k, name] = (float(true_xy[0]), float(true_xy[1]))
            stage[FIRST_Z + k, name] = (float(xy[0]), float(xy[1]))
    write_csv_manifest(str(root / "tiles.csv"), rows)
    layer = root / "montage"
    stages = montage.montage_stages(str(root / "tiles.csv"), str(layer), (8, 8, 40), chunk_size=(64, 64, 2))
    for s in stages:
        _run(s)
    return Stitched(root, layer, layer / montage.OUTLINES_DIR, truth, stage)


def test_outlines_stage_follows_the_report_on_the_montage_queue(tmp_path: Path) -> None:
    stages = montage.montage_stages(str(tmp_path / "tiles.csv"), str(tmp_path / "m"), (8, 8, 40))
    outlines, report = stages[-1], stages[-2]
    assert outlines.name == "montage.outlines" and outlines.service == "montage"
    assert outlines.requires() == (report,) and report.name == "montage.report"
    assert outlines.writes() == (f"file://{tmp_path / 'm' / 'tile_outlines'}",)


def test_outlines_refuse_to_start_before_the_solve(tmp_path: Path, stitched: Stitched) -> None:
    import shutil

    layer = tmp_path / "m"
    shutil.copytree(stitched.layer, layer)
    shutil.rmtree(layer / montage.OUTLINES_DIR)
    (layer / "montage" / "solve" / f"{FIRST_Z + 1:05d}.json.done").unlink()
    with pytest.raises(LayerError, match=r"montage solve results missing for sections \[6\]"):
        montage.create_montage_outline_tasks(str(layer))
    assert not (layer / montage.OUTLINES_DIR).exists()


def _tile_names(stitched: Stitched, z: int) -> list[str]:
    return [Path(t.path).name for t in montage.load_tile_set(str(stitched.layer)).section(z)]


def test_outlines_read_back_by_the_formats_specification(stitched: Stitched) -> None:
    reader = PrecomputedAnnotations(stitched.outlines)
    assert reader.annotation_type == "axis_aligned_bounding_box"
    assert reader.scales == pytest.approx([8e-9, 8e-9, 40e-9])
    assert [p["id"] for p in reader.properties] == ["tile", "section", "moved_px", "placed", "color"]
    lower, upper = np.array(reader.lower_bound), np.array(reader.upper_bound)
    # Off the origin, as the image layer is: its bounds with a pixel to spare for sub-pixel boxes.
    assert lower[2] == FIRST_Z and upper[2] == FIRST_Z + 2 and 30 < lower[0] <= ORIGIN[0] and 46 < lower[1] <= ORIGIN[1]
    spatial = reader.spatial
    assert [level["grid_shape"] for level in spatial] == [[1, 1, 2]] and spatial[0]["limit"] == 9

    seen = 0
    for cell, z in enumerate((FIRST_Z, FIRST_Z + 1)):
        boxes = reader.spatial_cell(0, (0, 0, cell))  # one cell per section
        names = _tile_names(stitched, z)
        solved = montage.load_section(str(stitched.layer), "solve", z)
        assert sorted(int(b.id) for b in boxes) == [z * montage.TILE_ID_STRIDE + i for i in range(9)]
        for box in boxes:
            tile, section, moved, placed, color = box.props
            index = int(box.id) - z * montage.TILE_ID_STRIDE
            name = names[index]
            a, b = np.asarray(box.point_a, float), np.asarray(box.point_b, float)
            assert int(tile) == index and int(section) == z
            assert b - a == pytest.approx([TILE, TILE, 1]) and a[2] == z
            assert np.all(a >= lower) and np.all(b <= upper)
            record = solved["tiles"][index]
            assert a[:2] == pytest.approx([record["x"], record["y"]], abs=1e-4)
            if (z - FIRST_Z, name) == (BLANK[0], f"z{BLANK[0]}_{BLANK[1]}.png"):
                # Left where the microscope said, and drawn so.
                assert int(placed) == 0 and list(color) == [255, 48, 0] and float(moved) == 0.0
                assert a[:2] == pytest.approx(stitched.stage[z, name], abs=1e-4)
            else:
                assert int(placed) == 1 and list(color) == [0, 220, 0]
                assert np.abs(a[:2] - stitched.truth[z, name]).max() < 1.0, name  # where the tile truly was
                stage_xy = np.array(stitched.stage[z, name])
                assert float(moved) == pytest.approx(np.hypot(*(a[:2] - stage_xy)), abs=1e-3) and float(moved) > 0
            by_id = reader.by_id(int(box.id))
            assert by_id.point_a.tolist() == box.point_a.tolist() and [int(p) for p in by_id.props[:1]] == [index]
            seen += 1
    assert seen == 18


def test_outline_tasks_rewrite_the_same_bytes(stitched: Stitched) -> None:
    cell = stitched.outlines / "spatial0" / "0_0_1"
    before = cell.read_bytes(), (stitched.outlines / "info").read_bytes()
    _run(montage.montage_stages(str(stitched.root / "tiles.csv"), str(stitched.layer), (8, 8, 40),
                                chunk_size=(64, 64, 2))[-1])
    assert (cell.read_bytes(), (stitched.outlines / "info").read_bytes()) == before


def test_state_and_short_link_show_the_outlines_as_an_annotation_layer(stitched: Stitched, tmp_path: Path) -> None:
    from exaconnect.viewer.links import short_link
    from exaconnect.viewer.state import build_state

    state = build_state([str(stitched.layer), str(stitched.outlines)], server="http://127.0.0.1:9999")
    image, outlines = state["layers"]
    assert image["type"] == "image" and image["source"][0]["url"] == "precomputed://http://127.0.0.1:9999/data/montage"
    assert outlines["type"] == "annotation" and outlines["name"] == "tile_outlines"
    assert outlines["source"][0]["url"] == "precomputed://http://127.0.0.1:9999/data/tile_outlines"
    assert "prop_color()" in outlines["shader"]
    assert neuroglancer.ViewerState(state).layers[1].type == "annotation"

    short = short_link([str(stitched.layer), str(stitched.outlines)], state_dir=tmp_path, name="montage")
    saved = json.loads((tmp_path / "montage.json").read_text())
    assert [layer["type"] for layer in saved["layers"]] == ["image", "annotation"]
    assert short.url.endswith("#!http://127.0.0.1:8765/states/montage.json")


def _get(port: int, path: str) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_view_serves_the_outline_files(stitched: Stitched) -> None:
    from exaconnect.viewer.server import ViewerServer

    with ViewerServer([str(stitched.layer), str(stitched.outlines)], statistics=False) as server:
        assert [layer["type"] for layer in server.state["layers"]] == ["image", "annotation"]
        source = server.state["layers"][1]["source"][0]["url"]
        base = source.removeprefix(f"precomputed://{server.origin}")
        status, headers, body = _get(server.port, f"{base}/info")
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body)["@type"] == "neuroglancer_annotations_v1"
        status, _, cell = _get(server.port, f"{base}/spatial0/0_0_1")
        assert status == 200 and cell == (stitched.outlines / "spatial0" / "0_0_1").read_bytes()
        # The cell as the format has it: uint64 count, 40-byte records, uint64 ids.
        count = int(np.frombuffer(cell[:8], "<u8")[0])
        ids = np.frombuffer(cell[8 + 40 * count:], "<u8")
        assert count == 9 and sorted(ids.tolist()) == [(FIRST_Z + 1) * montage.TILE_ID_STRIDE + i for i in range(9)]
        status, _, record = _get(server.port, f"{base}/by_id/{int(ids[0])}")
        assert status == 200 and record == cell[8:48]
        assert _get(server.port, f"{base}/spatial0/0_0_7")[0] == 404  # outside the sections: empty


def test_the_pipelines_link_keeps_the_montage_and_adds_its_outlines(stitched: Stitched, tmp_path: Path) -> None:
    """A run that stitched and then aligned: the link shows the aligned stack first, then the
    stitched sections and the tile outlines over them."""
    from exaconnect.pipeline import PipelinePlan, _links
    from exaconnect.pipeline_config import PipelineConfig
    from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, layer_url

    aligned = create_layer(str(tmp_path / "aligned"), LayerSpec("image", "uint8", (100, 100, 2), (8, 8, 40), (37, 53, 5),
                                                              (64, 64, 2)), Provenance(stage="align"))
    aligned[:, :, :] = np.full((100, 100, 2, 1), 80, dtype=np.uint8)
    montage_url = layer_url(str(stitched.layer))
    plan = PipelinePlan(PipelineConfig(name="tiles"), layer_url(str(tmp_path)),
                        layers={"image": layer_url(str(tmp_path / "aligned")), "aligned": layer_url(str(tmp_path / "aligned"))},
                        montage_layer=montage_url)
    links = _links(plan, plan.config)
    state = json.loads(Path(links["state"]).read_text())
    assert [(layer["name"], layer["type"]) for layer in state["layers"]] == [
        ("aligned", "image"), ("montage", "image"), ("tile_outlines", "annotation")]
    assert state["layers"][2]["source"][0]["url"] == "precomputed://http://127.0.0.1:8765/data/tile_outlines"
    assert links["short"].endswith("#!http://127.0.0.1:8765/states/tiles.json")


def test_neuroglancer_draws_each_outline_where_its_tile_went(stitched: Stitched) -> None:
    """Headless Chromium opens the short link on `exaconnect view`: the bundled neuroglancer reads
    our cells and draws the blank tile's box in red at its stage position, the others in green.
    The screenshot is kept as artifacts/montage_outlines.png."""
    import shutil
    import tempfile
    import time

    import imageio.v3 as iio

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium/chromedriver not installed (make browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "viewer"))  # the browser tests' helpers
    from test_viewer_browser import ARTIFACTS, CHROME_FLAGS, WINDOW, _panel_rects

    from exaconnect.viewer.links import short_link
    from exaconnect.viewer.server import ViewerServer

    layers = [str(stitched.layer), str(stitched.outlines)]
    z = FIRST_Z + BLANK[0]
    names = _tile_names(stitched, z)
    solved = montage.load_section(str(stitched.layer), "solve", z)
    blank = names.index(f"z{BLANK[0]}_{BLANK[1]}.png")
    green = next(i for i, t in enumerate(solved["tiles"]) if t["status"] == "placed")

    def edges(shot: np.ndarray, rect: dict, state: dict, index: int, color: tuple[int, int, int]) -> float:
        """Of the screen rows along the tile's left and right edges, the fraction with its colour there."""
        px, py, _ = state["position"]
        scale = state["crossSectionScale"]
        cx, cy = rect["x"] + rect["w"] / 2, rect["y"] + rect["h"] / 2
        x, y = solved["tiles"][index]["x"], solved["tiles"][index]["y"]
        top, bottom = int(cy + (y - py) / scale) + 3, int(cy + (y + TILE - py) / scale) - 3
        hits = []
        for edge_x in (x, x + TILE):
            sx = int(round(cx + (edge_x - px) / scale))
            band = shot[top:bottom, sx - 2 : sx + 3, :3].astype(int)
            hits += list((np.abs(band - np.array(color)).max(axis=2) <= 40).any(axis=1))
        return float(np.mean(hits)) if hits else 0.0

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="exaconnect-chromium-")
    for flag in (*CHROME_FLAGS, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    try:
        with ViewerServer(layers, port=0) as server:
            short = short_link(layers, state_dir=stitched.root / "states", name="outlines", server=server.origin)
            state = json.loads(Path(short.state_location).read_text())
            assert state["position"][2] == z + 0.5  # the section with the blank tile
            browser.get(short.url)
            deadline, seen = time.monotonic() + 90, (0.0, 0.0)
            while time.monotonic() < deadline:
                time.sleep(1.0)
                rects = _panel_rects(browser)
                if not rects:
                    continue
                png = browser.get_screenshot_as_png()
                shot = iio.imread(png, extension=".png")
                rect = sorted(rects, key=lambda r: r["x"])[0]
                seen = (edges(shot, rect, state, blank, (255, 48, 0)), edges(shot, rect, state, green, (0, 220, 0)))
                if min(seen) >= 0.8:
                    break
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "montage_outlines.png").write_bytes(png)
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert min(seen) >= 0.8, f"outline edges drawn (red blank tile, green placed tile): {seen}"
