"""The pipeline file: the example documents every option with its default, mistakes are named,
and the demo file plans the stages the demo promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from exaconnect.errors import InputError
from exaconnect.pipeline_config import PipelineConfig, load_pipeline, to_mapping

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _keys(mapping, prefix=""):
    out = set()
    for key, value in mapping.items():
        out.add(prefix + key)
        if isinstance(value, dict) and key not in ("set", "inference"):
            out |= _keys(value, prefix + key + ".")
    return out


def test_the_example_file_shows_every_option_with_its_default():
    import dataclasses

    loaded = load_pipeline(CONFIGS / "pipeline.yaml")
    # Sections registered by stage modules (refine, a lab's) sit beside ours with their defaults.
    assert dataclasses.replace(loaded, plugins={}) == PipelineConfig()
    documented = _keys(yaml.safe_load((CONFIGS / "pipeline.yaml").read_text()))
    assert _keys(to_mapping(loaded)) - {"segment.passes"} <= documented


@pytest.mark.parametrize("text, message", [
    ("segment: {subvolme: [64, 64, 64]}", "segment.subvolme: unknown key"),
    ("sgement: {}", "pipeline.sgement: unknown key"),
    ("segment: {subvolume: [64, 64]}", "segment.subvolume"),
    ("workers: two", "workers"),
    ("mesh: {enabled: 1}", "mesh.enabled"),
    ("segment: {passes: [{name: initial, sed_order: reverse}]}", "sed_order: unknown key"),
    ("source: {resolution: [.nan, 4, 4]}", "source.resolution"),
    ("- just\n- a list", "expected a mapping"),
])
def test_mistakes_are_named(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_pipeline(path)


def test_set_overrides_apply_and_are_checked(tmp_path):
    config = load_pipeline(CONFIGS / "demo.yaml", {"segment": {"subvolume": [32, 32, 32]}, "pipeline": {"workers": 0}})
    assert config.segment.subvolume == (32, 32, 32) and config.workers == 0
    with pytest.raises(InputError, match="segment.subvolum: unknown key"):
        load_pipeline(CONFIGS / "demo.yaml", {"segment": {"subvolum": [32, 32, 32]}})


def test_the_cli_reports_a_bad_pipeline_in_one_line(tmp_path, capsys):
    from exaconnect.cli import main

    path = tmp_path / "p.yaml"
    path.write_text("segment: {subvolme: [64, 64, 64]}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "segment.subvolme" in err[0]
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_the_demo_plans_every_stage_in_order(tmp_path):
    from exaconnect.pipeline import build_plan
    from exaconnect.services.stages import stage_graph

    config = load_pipeline(CONFIGS / "demo.yaml", {"pipeline": {"output": str(tmp_path / "out")},
                                                  "source": {"synthetic_shape": [32, 32, 32]},
                                                  "montage": {"tile_size": 20, "overlap": 8}})
    names = [s.name for s in stage_graph(build_plan(config).stages)]
    assert "ingest.image" not in names  # the demo's image is stitched from tiles
    for earlier, later in [("montage.match", "montage.render"), ("montage.render", "misalign"),
                           ("ingest.groundtruth", "misalign"), ("misalign", "align.flow"), ("align.render", "segment.initial"),
                           ("segment.initial", "segment.faces"),
                           ("pyramid.segmentation", "mesh.forge"), ("mesh.forge", "mesh.merge"),
                           ("pyramid.segmentation", "skeleton.forge"), ("align.apply-groundtruth", "evaluate"),
                           ("segment.relabel", "refine.fill"), ("refine.fill", "pyramid.refined"),
                           ("pyramid.refined", "mesh.forge"), ("pyramid.refined", "evaluate")]:
        assert names.index(earlier) < names.index(later)
    assert "train.demo-model" not in names  # the demo segments with the model kept in the repository
    without_align = load_pipeline(CONFIGS / "demo.yaml", {"pipeline": {"output": str(tmp_path / "out2")},
                                                         "misalign": {"enabled": False}, "align": {"enabled": False}})
    names = [s.name for s in build_plan(without_align).stages]
    assert not [n for n in names if n.startswith(("align", "misalign"))] and "segment.faces" in names


def test_set_reaches_an_option_inside_a_nested_section(tmp_path, capsys):
    """`--set refine.p2.enabled=true` sets one option of a nested section and keeps the rest of
    it as the file has it; a mistyped nested key is named; a key set as a value cannot then be
    a section."""
    from exaconnect.cli import main
    from exaconnect.cli.common import parse_sets

    assert parse_sets(["refine.p2.enabled=true", "refine.p2.min_segment_size=50", "refine.enabled=true"]) == {
        "refine": {"p2": {"enabled": True, "min_segment_size": 50}, "enabled": True}}
    assert parse_sets(["refine.fill={enabled: true}", "refine.fill.sigma=1"]) == {
        "refine": {"fill": {"enabled": True, "sigma": 1}}}
    with pytest.raises(InputError, match=r"refine.p2 was set to 3 by an earlier --set; expected a section"):
        parse_sets(["refine.p2=3", "refine.p2.enabled=true"])
    with pytest.raises(InputError, match="expected SECTION.KEY=VALUE"):
        parse_sets(["refine..enabled=true"])

    args = ["run", str(CONFIGS / "demo.yaml"), "--output", str(tmp_path / "out"), "--print-config"]
    assert main([*args, "--set", "refine.p2.enabled=true", "--set", "refine.fill.sigma=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["refine"]
    assert printed["p2"]["enabled"] is True and printed["p3"]["enabled"] is False  # p3 as demo.yaml has it
    assert printed["fill"]["enabled"] is True and printed["fill"]["sigma"] == 0.5
    assert main([*args, "--set", "refine.p2.enabld=true"]) == 2
    assert "refine.p2.enabld: unknown key" in capsys.readouterr().err
