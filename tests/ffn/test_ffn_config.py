"""FFN configuration: published defaults, validation messages, round trip beside a checkpoint."""

import dataclasses
import json

import pytest

from exaconnect.errors import InputError
from exaconnect.ffn.config import (
    FFNConfig,
    InferenceOptions,
    ModelConfig,
    load_config,
    save_config,
)


def test_defaults_are_the_published_fib25_settings():
    model = ModelConfig()
    assert (model.depth, model.fov_size, model.deltas, model.features) == (12, (33, 33, 33), (8, 8, 8), 32)
    opts = InferenceOptions()
    assert (opts.image_mean, opts.image_stddev) == (128.0, 33.0)
    assert (opts.init_activation, opts.pad_value) == (0.95, 0.05)
    assert (opts.move_threshold, opts.segment_threshold) == (0.9, 0.6)
    assert opts.min_segment_size == 1000
    assert opts.min_boundary_dist == (1, 1, 1)
    assert opts.seed_policy == "peaks"


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().depth = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"move_threshold": 1.0}, "move_threshold"),
        ({"segment_threshold": 0}, "segment_threshold"),
        ({"image_stddev": 0}, "image_stddev"),
        ({"min_segment_size": -1}, "min_segment_size"),
        ({"min_boundary_dist": (1, 1)}, "min_boundary_dist"),
        ({"seed_policy": "grid"}, "seed_policy"),
        ({"seed_policy": "list"}, "seeds"),
        ({"precision": "int8"}, "precision"),
    ],
)
def test_invalid_inference_options_name_the_parameter(kwargs, name):
    with pytest.raises(InputError, match=name):
        InferenceOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"depth": 0}, "depth"), ({"fov_size": (32, 33, 33)}, "fov_size"), ({"deltas": (20, 8, 8)}, "deltas")],
)
def test_invalid_model_config_names_the_parameter(kwargs, name):
    with pytest.raises(InputError, match=name):
        ModelConfig(**kwargs)


def test_flops_per_evaluation_counts_every_convolution():
    # 33^3 voxels x 2 x (27*2*32 + 23*27*32*32 + 32) multiply-adds.
    assert ModelConfig().flops_per_evaluation() == 2 * 35937 * (1728 + 23 * 27648 + 32)


def test_config_round_trip(tmp_path):
    config = FFNConfig(
        model=ModelConfig(depth=3, features=8),
        inference=InferenceOptions(seed_policy="list", seeds=[(20, 20, 20)], min_segment_size=10),
    )
    save_config(config, tmp_path)
    assert load_config(tmp_path) == config


def test_yaml_config_and_unknown_keys(tmp_path):
    (tmp_path / "a.yaml").write_text("inference:\n  move_threshold: 0.8\n")
    assert load_config(tmp_path / "a.yaml").inference.move_threshold == 0.8
    (tmp_path / "b.json").write_text(json.dumps({"inference": {"move_treshold": 0.8}}))
    with pytest.raises(InputError, match="move_treshold"):
        load_config(tmp_path / "b.json")
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.json")
