"""The segment service end to end through real fq:// queues and spawned workers: FFN passes with
a tiny network on the synthetic sample, stitch stages on independently labelled subvolumes,
reruns after interruption, and completion markers guarding every staging file."""

from __future__ import annotations

import numpy as np
import pytest

from exaconnect.errors import LayerError
from exaconnect.precomputed.bbox import Box
from exaconnect.precomputed.evaluate import segmentation_metrics
from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, layer_bounds, open_layer, read_box, write_box
from exaconnect.precomputed.stitching import MatchOptions, pack_ids
from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume
from exaconnect.services.segment_staging import (
    PassSpec,
    encode_labels,
    get_complete,
    is_complete,
    labels_path,
    load_run,
    put_complete,
    read_labels,
)

SHAPE = (48, 48, 48)  # z, y, x
SUBVOLUME = (24, 24, 24)
OVERLAP = (8, 8, 8)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    image, labels = synthetic_volume(SyntheticSpec(shape=SHAPE, neurites=10, seed=2))
    size = tuple(reversed(SHAPE))
    vol = create_layer(str(root / "image"), LayerSpec("image", "uint8", size, (10.0, 10.0, 10.0), chunk_size=(8, 8, 8)),
                       Provenance("test"))
    write_box(vol, Box((0, 0, 0), size), image)
    return root, image, labels


@pytest.fixture(scope="module")
def tiny_model(sample):
    from conftest import make_tiny_ffn

    return make_tiny_ffn(sample[0] / "tiny_ffn")


def test_ffn_passes_stitch_and_rerun_through_the_queue(sample, tiny_model):
    from exaconnect.services.segment import SegmentTask
    from exaconnect.services.segment_stages import SegmentPlan, segment_volume
    from exaconnect.services.stitch import SegmentFacesTask, relabel_cell

    root, _, _ = sample
    passes = (PassSpec("initial", tiny_model),
              PassSpec("refine", tiny_model, seed_order="reverse", consensus_with="initial"))
    plan = SegmentPlan(str(root / "image"), str(root / "ffn_seg"), passes, SUBVOLUME, OVERLAP, downsample_mips=1)
    # One in-process worker keeps this test quick; test_stitch_stages_... runs two processes.
    run, report = segment_volume(plan, str(root / "queue_ffn"), workers=1, progress=False)
    assert {name: r.tasks for name, r in report.results.items()} == {
        "segment.initial": 8, "segment.refine": 8, "segment.faces": 8, "segment.equivalence": 1,
        "segment.relabel": 8, "pyramid.segmentation": 1}
    # A second run finds every stage complete and does nothing.
    _, again = segment_volume(plan, str(root / "queue_ffn"), workers=1, progress=False)
    assert {r.status for r in again.results.values()} == {"skipped"}

    seg = open_layer(run.segmentation_layer)
    size = tuple(reversed(SHAPE))
    out = read_box(seg, Box((0, 0, 0), size))
    assert out.dtype == np.uint64 and (out != 0).any()
    assert open_layer(run.segmentation_layer, mip=1).shape[:3] == (24, 24, 24)
    for cell in run.grid.cells():
        labels, box = relabel_cell(run, "refine", cell.index)
        (x0, y0, z0), (x1, y1, z1) = box.start, box.stop
        assert np.array_equal(out[z0:z1, y0:y1, x0:x1], labels)

    # Consensus only ever splits: each refined object lies inside one initial object.
    for cell in run.grid.cells():
        first, _ = read_labels(run.staging, "initial", cell.index)
        refined, _ = read_labels(run.staging, "refine", cell.index)
        inside = refined != 0
        pairs = np.unique(np.stack([refined[inside], first[inside]], 1), axis=0)
        assert len(np.unique(pairs[:, 0])) == len(pairs) and (pairs[:, 1] != 0).all()

    # An interrupted task (marker gone, file torn) is not read, and its rerun is identical.
    index = [1, 0, 1]
    path = labels_path("initial", index)
    before = get_complete(run.staging, path)
    from cloudfiles import CloudFiles

    cf = CloudFiles(run.staging)
    cf.delete(path + ".done")
    cf.put(path, before[: len(before) // 2], compress=None, raw=True)
    assert not is_complete(run.staging, path)
    with pytest.raises(LayerError, match="not complete"):
        SegmentFacesTask(run.staging, "initial", [1, 0, 0]).execute()
    SegmentTask(run.staging, "initial", index).execute()
    assert get_complete(run.staging, path) == before


def _write_pieces(run, labels: np.ndarray, seed: int = 0) -> None:
    """Stand-in for the FFN stage: each cell's true labels, numbered independently."""
    rng = np.random.default_rng(seed)
    for cell in run.grid.cells():
        (x0, y0, z0), (x1, y1, z1) = cell.read.start, cell.read.stop
        part = labels[z0:z1, y0:y1, x0:x1]
        ids = np.unique(part[part != 0])
        lut = np.zeros(int(labels.max()) + 1, np.uint32)
        lut[ids] = rng.permutation(len(ids)).astype(np.uint32) + 1
        put_complete(run.staging, labels_path("truth", cell.index), encode_labels(lut[part], cell.read))


def test_stitch_stages_through_the_queue_recover_the_truth(sample):
    from exaconnect.services.segment import add_pass, prepare_run
    from exaconnect.services.runner import RunnerOptions, run_stages
    from runner_tasks import task_stage

    from exaconnect.services.stitch import create_equivalence_tasks, create_faces_tasks, create_relabel_tasks

    root, _, labels = sample
    run = prepare_run(str(root / "image"), str(root / "truth_seg"), SUBVOLUME, OVERLAP,
                      match=MatchOptions(min_overlap_voxels=1), overwrite=True)
    run = add_pass(run.staging, PassSpec("truth", "unused-model"))
    _write_pieces(run, labels)
    queue = str(root / "queue_stitch")
    for name, make, workers in (("faces", create_faces_tasks, 2), ("equivalence", create_equivalence_tasks, 1),
                                ("relabel", create_relabel_tasks, 1)):
        stage = task_stage(f"segment.{name}", "segment", lambda make=make: make(run))
        run_stages([stage], RunnerOptions(queue, str(root / "stitch_records"), workers=workers, progress=False))
    out = read_box(open_layer(run.segmentation_layer), Box((0, 0, 0), tuple(reversed(SHAPE))))
    metrics = segmentation_metrics(out, labels)
    assert metrics["vi_split"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["vi_merge"] == pytest.approx(0.0, abs=1e-9)
    # Global IDs carry the task number of the object's smallest member.
    assert out.max() >= pack_ids(np.array([1]), 0)[0]
    assert load_run(run.staging).final_pass == "truth"


def test_prepare_run_rejects_unaligned_geometry(sample):
    from exaconnect.errors import InputError
    from exaconnect.services.segment import prepare_run

    root = sample[0]
    with pytest.raises(InputError, match="--subvolume"):
        prepare_run(str(root / "image"), str(root / "bad"), (20, 24, 24), OVERLAP)
    with pytest.raises(InputError, match="--bbox"):
        prepare_run(str(root / "image"), str(root / "bad"), SUBVOLUME, OVERLAP, bbox=Box((4, 0, 0), (48, 48, 48)))
    with pytest.raises(InputError, match="--overlap"):
        prepare_run(str(root / "image"), str(root / "bad"), SUBVOLUME, (24, 8, 8))


def test_cli_stages_in_order(sample, tiny_model, capsys):
    from exaconnect.cli import main

    root = sample[0]
    queue = str(root / "queue_cli")
    image, out = str(root / "image"), str(root / "cli_seg")
    common = [image, out, "--model", tiny_model, "--subvolume", "24,24,24", "--overlap", "8,8,8",
              "--bbox", "0,0,0,48,48,24", "--queue", queue]
    for stage in ("pass", "faces", "equivalence", "relabel"):
        assert main(["segment", "enqueue", *common, "--stage", stage]) == 0
        if stage == "pass":
            assert "enqueued 4 segment.initial tasks" in capsys.readouterr().out
        assert main(["queue", "work", f"{queue}/segment", "--exit-when-empty"]) == 0
    assert main(["queue", "status", f"{queue}/segment"]) == 0
    # The layer covers the --bbox (the lower half in z) and is complete.
    vol = open_layer(out)
    assert layer_bounds(vol) == Box((0, 0, 0), (48, 48, 24))
    assert read_box(vol, layer_bounds(vol)).any()
    assert main(["segment", "enqueue", *common[:5], "20,24,24", *common[6:]]) == 2
    assert "--subvolume" in capsys.readouterr().err


def test_redefining_a_pass_discards_its_finished_files(sample):
    from exaconnect.services.segment import add_pass, prepare_run

    root, _, labels = sample
    run = prepare_run(str(root / "image"), str(root / "redefine"), SUBVOLUME, OVERLAP, overwrite=True)
    run = add_pass(run.staging, PassSpec("truth", "model-a"))
    _write_pieces(run, labels)
    path = labels_path("truth", [0, 0, 0])
    add_pass(run.staging, PassSpec("truth", "model-a"))  # unchanged: work is kept
    assert is_complete(run.staging, path)
    add_pass(run.staging, PassSpec("truth", "model-b"))
    assert not is_complete(run.staging, path)


def test_equivalence_waits_for_every_face(sample):
    from exaconnect.services.segment import add_pass, prepare_run
    from exaconnect.services.stitch import SegmentEquivalenceTask, SegmentFacesTask

    root, _, labels = sample
    run = prepare_run(str(root / "image"), str(root / "faces_missing"), SUBVOLUME, OVERLAP, overwrite=True)
    run = add_pass(run.staging, PassSpec("truth", "unused-model"))
    _write_pieces(run, labels)
    cells = run.grid.cells()
    for cell in cells[:-1]:
        SegmentFacesTask(run.staging, "truth", list(cell.index)).execute()
    with pytest.raises(LayerError, match="missing for cells"):
        SegmentEquivalenceTask(run.staging, "truth").execute()
    SegmentFacesTask(run.staging, "truth", list(cells[-1].index)).execute()
    SegmentEquivalenceTask(run.staging, "truth").execute()
