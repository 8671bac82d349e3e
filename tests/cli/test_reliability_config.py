"""Issue 24, item 11: pipeline mistakes are refused when the file is loaded, before anything runs:
an empty pipeline file, `--forget` of a stage the pipeline does not have, and a negative
`segment.subvolume` (also under `--print-config`), each one line naming the key, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


from conftest import one_line as _one_line  # noqa: E402
from conftest import run_cli as _cli  # noqa: E402


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_pipeline_file_is_an_error_not_the_default_pipeline(tmp_path, capsys, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(text)
    for extra in ([], ["--print-config"]):
        code, out, err = _cli(["run", "p.yaml", *extra], capsys)
        assert code == 2 and "p.yaml" in _one_line(err) and "empty" in err, err
        assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_an_explicit_empty_mapping_still_asks_for_the_defaults(tmp_path):
    from exaconnect.pipeline_config import PipelineConfig, load_pipeline

    (tmp_path / "p.yaml").write_text("{}\n")
    import dataclasses

    # sections registered by stage modules (refine) come with their defaults beside ours
    assert dataclasses.replace(load_pipeline(tmp_path / "p.yaml"), plugins={}) == PipelineConfig()


@pytest.mark.parametrize("value", ["[-32,32,32]", "[0,64,64]", "[64,64]"])
def test_a_bad_subvolume_is_refused_at_load_time_naming_the_key(tmp_path, capsys, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--print-config"]):
        code, out, err = _cli(["run", DEMO, "--output", tmp_path / "out", "--queue-root", tmp_path / "q",
                               "--set", f"segment.subvolume={value}", *extra], capsys)
        assert code == 2 and "segment.subvolume" in _one_line(err), err
        assert out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key,value", [("segment.overlap", "[-1,8,8]"), ("mesh.shape", "[0,32,32]"),
                                       ("pyramid.factor", "[2,0,2]"), ("ingest.chunk_size", "[-16,16,16]"),
                                       ("segment.bbox", "[10,0,0,5,8,8]")])
def test_other_bad_sizes_are_refused_naming_their_key(tmp_path, capsys, key, value):
    code, _, err = _cli(["run", DEMO, "--print-config", "--set", f"{key}={value}"], capsys)
    assert code == 2 and key in _one_line(err), err


def test_forgetting_an_unknown_stage_is_an_error_naming_the_known_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(["run", DEMO, "--output", tmp_path / "out", "--queue-root", tmp_path / "q",
                         "--forget", "nosuchstage"], capsys)
    line = _one_line(err)
    assert code == 2 and "--forget nosuchstage" in line and "ingest.groundtruth" in line and "segment" in line, err
    assert not (tmp_path / "q").exists()


def test_forgetting_a_known_prefix_is_accepted(tmp_path):
    from exaconnect.cli.pipeline import _forgotten
    from exaconnect.pipeline import build_plan
    from exaconnect.pipeline_config import load_pipeline

    config = load_pipeline(DEMO, {"pipeline": {"output": str(tmp_path / "out"), "queue_root": str(tmp_path / "q")}})
    plan = build_plan(config)
    names = _forgotten(plan, ["mesh"])
    assert "mesh.forge" in names and "mesh.merge" in names and "ingest.image" not in names
