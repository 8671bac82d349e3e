"""Hyperparameter sweeps as queue tasks, the training CLI, and partitions as queue tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from exaconnect.errors import InputError
from exaconnect.ffn.training.sweep import build_sweep, load_sweep, summarize_sweep, write_summary

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "model": {"depth": 2, "fov_size": [11, 11, 11], "deltas": [3, 3, 3], "features": 6},
    "data": {"volumes": [{"name": "s", "image": "synthetic:3", "labels": "synthetic:3:labels"}],
             "validation_volumes": [{"name": "v", "image": "synthetic:4", "labels": "synthetic:4:labels"}],
             "min_size": 500},
    "training": {"max_steps": 6, "batch_size": 2, "summary_every_steps": 2, "validation_every_steps": 6,
                 "validation_examples": 2, "progress": False},
}


def test_grid_expands_to_validated_points(tmp_path):
    sweep = build_sweep(BASE, {"optimizer.learning_rate": [0.001, 0.0003], "training.batch_size": [2, 4],
                               "model.depth": [2, 3], "optimizer.name": ["adam", "sgd"]}, str(tmp_path))
    assert len(sweep.points) == 16
    names = {p.name for p in sweep.points}
    assert "lr-0.0003_bs-4_depth-3_opt-sgd" in names
    point = next(p for p in sweep.points if p.name == "lr-0.0003_bs-4_depth-3_opt-sgd")
    assert point.config["model"]["depth"] == 3 and point.config["optimizer"]["name"] == "sgd"
    assert point.config["training"]["out_dir"] == str(tmp_path / point.name)
    assert point.config["training"]["max_steps"] == 6  # untouched base values stay
    with pytest.raises(InputError, match="optimizer.name"):
        build_sweep(BASE, {"optimizer.name": ["adam", "lion"]}, str(tmp_path))
    with pytest.raises(InputError, match="trainer.x"):
        build_sweep(BASE, {"trainer.x": [1]}, str(tmp_path))


def test_the_shipped_configs_are_valid():
    from exaconnect.ffn.training.config import load_train_config

    config = load_train_config(ROOT / "configs" / "train_synthetic.yaml")
    assert config.training.max_minutes > 0
    assert len(load_sweep(ROOT / "configs" / "sweep_synthetic.yaml").points) == 16


def test_sweep_tasks_run_on_a_real_queue_and_are_ranked(tmp_path):
    from exaconnect.services.queue import enqueue, queue_status
    from exaconnect.services.train import create_sweep_tasks
    from exaconnect.services.worker import Worker, WorkerOptions

    base = json.loads(json.dumps(BASE))
    base["data"]["cache_dir"] = str(tmp_path / "partitions")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep_path = tmp_path / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump({"base": "base.yaml", "out_dir": str(tmp_path / "runs"),
                                          "grid": {"optimizer.learning_rate": [0.003, 1e-9]}}))
    queue = f"fq://{tmp_path / 'queue'}"
    assert enqueue(queue, create_sweep_tasks(str(sweep_path))) == 2
    Worker(queue, WorkerOptions(exit_when_empty=True, idle_poll_seconds=0.1, lease_seconds=120)).run()
    status = queue_status(queue)
    assert status.enqueued == 0 and status.failed == 0
    sweep = load_sweep(sweep_path)
    rows = summarize_sweep(sweep)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [r["rank"] for r in rows] == [1, 2]
    for row in rows:
        result = json.loads((tmp_path / "runs" / row["name"] / "result.json").read_text())
        assert result["step"] == 6 and "f1" in result["validation"]
    # Ranked by the validation metric.
    assert rows[0]["metric"] >= rows[1]["metric"]
    paths = write_summary(sweep, rows)
    assert paths["plot"].stat().st_size > 0
    table = paths["table"].read_text()
    assert rows[0]["name"] in table and "| rank |" in table


def test_train_cli_parses_config_and_overrides(tmp_path, capsys):
    from exaconnect.cli.train import register

    (tmp_path / "train.yaml").write_text(yaml.safe_dump(BASE))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "run", "--config", str(tmp_path / "train.yaml"),
                              "--set", "training.max_steps=42", "--set", "optimizer.name=adam", "--print-config"])
    assert args.func(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["max_steps"] == 42 and printed["optimizer"]["name"] == "adam"
    args = parser.parse_args(["train", "run", "--config", str(tmp_path / "train.yaml"),
                              "--set", "training.batch=3"])
    with pytest.raises(InputError, match="batch"):
        args.func(args)


def test_partition_tasks_equal_the_whole_volume_computation(tmp_path):
    from exaconnect.ffn.training.data import compute_partitions
    from exaconnect.precomputed.bbox import Box
    from exaconnect.precomputed.layers import LayerSpec, Provenance, create_layer, open_layer, read_box, write_box
    from exaconnect.services.train import create_partition_tasks

    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(1, 6, size=(5, 6, 6)), np.ones((8, 8, 8), dtype=np.int64)).astype(np.uint32)
    spec = LayerSpec(layer_type="segmentation", dtype="uint32", size=(48, 48, 40), resolution=(10, 10, 10),
                     voxel_offset=(0, 0, 0), chunk_size=(16, 16, 16))
    vol = create_layer(str(tmp_path / "seg"), spec, Provenance(stage="test", parameters={}, inputs=[]))
    write_box(vol, Box((0, 0, 0), (48, 48, 40)), labels)
    tasks = create_partition_tasks(str(tmp_path / "seg"), str(tmp_path / "parts"), (3, 4, 4), (0.2, 0.5, 0.8),
                                   min_size=0, block_size=(16, 16, 16))
    assert len(tasks) == 3 * 3 * 3
    for task in tasks:
        task.execute()
    got = read_box(open_layer(str(tmp_path / "parts")), Box((0, 0, 0), (48, 48, 40)))
    np.testing.assert_array_equal(got, compute_partitions(labels, (0.2, 0.5, 0.8), (3, 4, 4)))
    # Training reads that layer instead of computing partitions itself.
    from exaconnect.ffn.training.config import VolumeSource
    from exaconnect.ffn.training.data import build_example_source

    source = VolumeSource("big", str(tmp_path / "seg"), str(tmp_path / "seg"), partitions=str(tmp_path / "parts"))
    examples = build_example_source([source], (9, 9, 9), (3, 4, 4), (0.2, 0.5, 0.8), 0, 128.0, 33.0,
                                    tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    computed = build_example_source([VolumeSource("big", str(tmp_path / "seg"), str(tmp_path / "seg"))], (9, 9, 9),
                                    (3, 4, 4), (0.2, 0.5, 0.8), 0, 128.0, 33.0, tmp_path / "cache")
    assert examples.sampler.counts() == computed.sampler.counts()


def test_train_sweep_run_trains_every_point_in_this_process(tmp_path, capsys):
    """`train sweep run SWEEP` needs no queue: the sweep stage runs here through a temporary one."""
    from exaconnect.cli import main

    base = json.loads(json.dumps(BASE))
    base["data"]["cache_dir"] = str(tmp_path / "partitions")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep_path = tmp_path / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump({"base": "base.yaml", "out_dir": str(tmp_path / "runs"),
                                          "grid": {"optimizer.learning_rate": [0.003]}}))
    assert main(["train", "sweep", "run", str(sweep_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train.sweep"]["status"] == "done" and report["train.sweep"]["tasks"] == 1
    assert [r["status"] for r in summarize_sweep(load_sweep(sweep_path))] == ["done"]
