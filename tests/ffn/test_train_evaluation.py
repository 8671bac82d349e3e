"""Checkpoint evaluation by segmentation quality: kept checkpoints, records, queue tasks, the
run summary that chooses and exports a checkpoint, sweeps ranked by it; training progress
lines and the deterministic demo model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from exaconnect.errors import InputError
from exaconnect.ffn.training.config import train_config_from_dict

from conftest import FIB25

MODEL = {"depth": 2, "fov_size": [11, 11, 11], "deltas": [3, 3, 3], "features": 6}
# Off the origin and not a multiple of anything: the box must be read where it says.
SYN_BOX = {"name": "val", "image": "synthetic:4", "labels": "synthetic:4:labels", "bbox": [13, 7, 21, 61, 55, 69]}


def config_dict(out_dir, evaluation=None, **training):
    opts = {"out_dir": str(out_dir), "batch_size": 2, "max_steps": 12, "summary_every_steps": 3,
            "validation_every_steps": 1000, "validation_examples": 0, "progress": False,
            "checkpoint_every_steps": 1000, "keep_checkpoints": 1}
    opts.update(training)
    return {
        "model": MODEL,
        "data": {"volumes": [{"name": "s", "image": "synthetic:3", "labels": "synthetic:3:labels"}],
                 "min_size": 500, "cache_dir": str(Path(out_dir).parent / "partitions")},
        "optimizer": {"name": "adam", "learning_rate": 0.003},
        "training": opts,
        "inference": {"min_segment_size": 100},
        "evaluation": evaluation if evaluation is not None else {"boxes": [SYN_BOX], "every_steps": 6},
    }


def direct_scores(model_dir, image_src, labels_src, bbox, overrides=None):
    """Independent of ffn.training.evaluation: load the exported model, read the box, segment, score."""
    from exaconnect.ffn import load_model, segment_subvolume
    from exaconnect.ffn.training.config import VolumeSource
    from exaconnect.ffn.training.data import read_volume
    from exaconnect.precomputed.evaluate import segmentation_metrics

    volume = read_volume(VolumeSource("x", image_src, labels_src, tuple(bbox)))
    predictor = load_model(model_dir, config_overrides=overrides, device="cpu")
    labels = segment_subvolume(volume.image, predictor).labels
    return segmentation_metrics(labels, volume.labels), float(np.mean(labels == 0))


def test_evaluation_config_is_validated():
    with pytest.raises(InputError, match="evaluation.metric"):
        train_config_from_dict(config_dict("/tmp/x", {"boxes": [SYN_BOX], "metric": "f1"}))
    with pytest.raises(InputError, match="evaluation.boxes is empty"):
        train_config_from_dict(config_dict("/tmp/x", {"every_steps": 5}))
    with pytest.raises(InputError, match="evaluation: unknown option"):
        train_config_from_dict(config_dict("/tmp/x", {"boxes": [SYN_BOX], "every": 5}))
    with pytest.raises(InputError, match="evaluation.inference"):
        train_config_from_dict(config_dict("/tmp/x", {"boxes": [SYN_BOX], "inference": {"segment_threshold": 2}}))
    with pytest.raises(InputError, match="checkpoint_at_steps"):
        train_config_from_dict(config_dict("/tmp/x", checkpoint_at_steps=[0]))
    config = train_config_from_dict(config_dict("/tmp/x", checkpoint_at_steps=[9, 3], checkpoint_at_cpu_minutes=[2]))
    assert config.training.checkpoint_at_steps == (3, 9)
    assert config.evaluation.boxes[0].bbox == (13, 7, 21, 61, 55, 69)


def test_training_evaluates_kept_checkpoints_and_summary_exports_the_best(tmp_path):
    from exaconnect.ffn.training.evaluation import list_checkpoints, read_evaluations, summarize_run
    from exaconnect.ffn.training.loop import train

    run = tmp_path / "run"
    config = train_config_from_dict(config_dict(run, checkpoint_at_steps=[7]))
    train(config)  # no queue, no callback: evaluated in process at steps 6 and 12
    kept = list_checkpoints(run)
    # keep_checkpoints=1 rotates train_state/, but evaluation and milestone checkpoints stay.
    assert {6, 7, 12} <= set(kept) and "milestones" in kept[6]
    records = read_evaluations(run)
    assert [r["step"] for r in records] == [6, 12]
    for r in records:
        assert set(r) >= {"vi", "vi_split", "vi_merge", "adapted_rand_error", "unsegmented_fraction"}
        assert r["boxes"][0]["bbox"] == SYN_BOX["bbox"] and r["boxes"][0]["voxels"] == 48 ** 3
        assert r["vi"] == pytest.approx(r["vi_split"] + r["vi_merge"])

    summary = summarize_run(run, "vi")
    best = min(records, key=lambda r: (r["vi"], -r["step"]))
    assert summary["chosen"]["step"] == best["step"]
    assert Path(summary["plot"]).stat().st_size > 10_000
    table = Path(summary["table"]).read_text()
    assert "**chosen**" in table and "adapted_rand_error" in table
    selection = json.loads((run / "model" / "selection.json").read_text())
    assert selection["step"] == best["step"] and selection["metric"] == "vi"
    assert (run / "last_model" / "ffn_config.json").is_file()
    # The exported model, loaded as a user would, reproduces the record on the same box.
    metrics, unsegmented = direct_scores(run / "model", SYN_BOX["image"], SYN_BOX["labels"], SYN_BOX["bbox"])
    assert metrics["vi"] == pytest.approx(best["vi"], abs=1e-9)
    assert metrics["adapted_rand_error"] == pytest.approx(best["adapted_rand_error"], abs=1e-9)
    assert unsegmented == pytest.approx(best["unsegmented_fraction"])

    # Resuming keeps the chosen model; the latest weights go to last_model/.
    stamp = (run / "model" / "ckpt.index").stat().st_mtime_ns
    train(train_config_from_dict(config_dict(run, max_steps=14)))
    assert (run / "model" / "ckpt.index").stat().st_mtime_ns == stamp
    assert (run / "model" / "selection.json").is_file()


def test_evaluation_tasks_run_on_a_real_queue_once(tmp_path):
    from exaconnect.ffn.training.evaluation import read_evaluations
    from exaconnect.ffn.training.loop import train
    from exaconnect.services.queue import enqueue, queue_status
    from exaconnect.services.train import create_evaluation_tasks, evaluation_enqueuer
    from exaconnect.services.worker import Worker, WorkerOptions

    run = tmp_path / "run"
    root = f"fq://{tmp_path / 'queues'}"
    config = train_config_from_dict(config_dict(run, {"boxes": [SYN_BOX], "every_steps": 4, "queue": root}))
    train(config, on_evaluation_checkpoint=evaluation_enqueuer(config))
    queue = f"{root}/train"
    assert queue_status(queue).enqueued == 3  # steps 4, 8, 12, enqueued while training went on
    assert read_evaluations(run) == []
    Worker(queue, WorkerOptions(exit_when_empty=True, idle_poll_seconds=0.1, lease_seconds=300)).run()
    assert queue_status(queue).failed == 0
    assert [r["step"] for r in read_evaluations(run)] == [4, 8, 12]
    # Every checkpoint of the finished run now has a record: nothing more to enqueue.
    assert create_evaluation_tasks(str(run)) == []
    assert enqueue(queue, create_evaluation_tasks(str(run), steps=[4])) == 0


def test_train_cli_evaluate_and_summary(tmp_path, capsys):
    from exaconnect.cli.train import register
    from exaconnect.ffn.training.evaluation import read_evaluations
    from exaconnect.ffn.training.loop import train

    run = tmp_path / "run"
    train(train_config_from_dict(config_dict(run, {"boxes": [SYN_BOX]}, checkpoint_every_steps=6,
                                             keep_checkpoints=0)))
    assert read_evaluations(run) == []  # no every_steps: nothing evaluated while training
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "evaluate", str(run), "--every-steps", "6"])
    assert args.func(args) == 0
    assert [r["step"] for r in read_evaluations(run)] == [6, 12]
    capsys.readouterr()
    args = parser.parse_args(["train", "summary", str(run), "--metric", "adapted_rand_error"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "chosen by adapted_rand_error: step" in out and (run / "evaluation.png").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "summary", str(run), "--metric", "f1"])


def test_sweeps_rank_runs_by_their_best_checkpoint(tmp_path):
    from exaconnect.ffn.training.sweep import build_sweep, summarize_sweep, write_summary

    base = config_dict(tmp_path / "unused", {"boxes": [SYN_BOX]})
    sweep = build_sweep(base, {"optimizer.learning_rate": [0.001, 0.0003, 0.0001]}, str(tmp_path / "sweep"),
                        metric="adapted_rand_error")
    # Finished runs with evaluation records: the best checkpoint decides, not the last one.
    ares = {0: [0.5, 0.2, 0.6], 1: [0.3, 0.3], 2: [0.4]}
    for index, point in enumerate(sweep.points):
        run = Path(point.config["training"]["out_dir"])
        (run / "evaluations").mkdir(parents=True)
        for k, are in enumerate(ares[index]):
            (run / "evaluations" / f"step-{(k + 1) * 100:08d}.json").write_text(json.dumps(
                {"step": (k + 1) * 100, "adapted_rand_error": are, "vi": 1.0, "vi_split": 0.5, "vi_merge": 0.5,
                 "unsegmented_fraction": 0.1}))
        (run / "result.json").write_text(json.dumps({"step": 300, "last_loss": 0.3, "examples_per_second": 5.0,
                                                     "validation": {"f1": 0.9 - index}}))
    rows = summarize_sweep(sweep)
    assert [r["name"] for r in rows] == [sweep.points[i].name for i in (0, 1, 2)]
    assert rows[0]["metric"] == 0.2 and rows[0]["chosen_step"] == 200
    assert "chosen_step" in write_summary(sweep, rows)["table"].read_text()
    with pytest.raises(InputError, match="metric"):
        build_sweep(base, {"optimizer.learning_rate": [0.001]}, str(tmp_path / "s2"), metric="are")


@pytest.mark.skipif(not FIB25.is_dir(), reason=f"FIB-25 sample absent at {FIB25}")
def test_checkpoint_evaluation_on_fib25_layers_off_the_chunk_grid(tmp_path):
    """A box of real layers that starts and ends between chunks (chunk 64): the record equals
    segmenting that box by hand with the run's inference options."""
    from exaconnect.ffn.training.evaluation import evaluate_checkpoint
    from exaconnect.ffn.training.loop import train
    from exaconnect.services.ingest import IngestOptions, ingest_now

    image, labels = tmp_path / "image", tmp_path / "gt"
    ingest_now(str(FIB25 / "grayscale_maps"), str(image), IngestOptions("image", (10, 10, 10), chunk_size=(64, 64, 64)),
               progress=False)
    ingest_now(f"{FIB25 / 'groundtruth.h5'}:stack", str(labels),
               IngestOptions("segmentation", (10, 10, 10), chunk_size=(64, 64, 64)), progress=False)
    box = {"name": "fib", "image": str(image), "labels": str(labels), "bbox": [37, 45, 129, 93, 101, 171]}
    data = config_dict(tmp_path / "run", {"boxes": [box], "inference": {"min_segment_size": 50}}, max_steps=3)
    data["data"]["volumes"] = [{"name": "t", "image": str(image), "labels": str(labels), "bbox": [70, 70, 10, 134, 134, 74]}]
    data["data"]["min_size"] = 100
    train(train_config_from_dict(data))
    record = evaluate_checkpoint(tmp_path / "run", 3)
    assert record["boxes"][0]["voxels"] == 56 * 56 * 42
    metrics, unsegmented = direct_scores(tmp_path / "run" / "model", str(image), str(labels), box["bbox"],
                                         overrides={"min_segment_size": 50})
    assert record["vi"] == pytest.approx(metrics["vi"], abs=1e-9)
    assert record["adapted_rand_error"] == pytest.approx(metrics["adapted_rand_error"], abs=1e-9)
    assert record["unsegmented_fraction"] == pytest.approx(unsegmented)


def test_progress_lines_when_not_on_a_terminal(tmp_path, capsys):
    from exaconnect.ffn.training.loop import train

    train(train_config_from_dict(config_dict(tmp_path / "run", {}, max_steps=8, progress=True,
                                             progress_every_steps=4)))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: step")]
    assert len(lines) == 2 and "train: step 8/8 (100 %)" in lines[1]
    assert "steps/s" in lines[0] and "left" in lines[0]


def test_deterministic_training_gives_the_same_weights(tmp_path):
    from exaconnect.ffn.checkpoint import load_network
    from exaconnect.ffn.training.loop import train

    weights = []
    for name in ("a", "b"):
        train(train_config_from_dict(config_dict(tmp_path / name, {}, max_steps=6, deterministic=True)))
        model, _ = load_network(tmp_path / name / "model")
        weights.append(model.numpy_weights()[0])
    for key in weights[0]:
        np.testing.assert_array_equal(weights[0][key], weights[1][key])
