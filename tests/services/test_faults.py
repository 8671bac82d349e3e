"""Fault injection on a real pipeline (ingest -> pyramid -> FFN with a small model -> stitching ->
mesh -> skeletons -> evaluate) through the stage runner with several worker processes. The heavy
sweep over every scenario is `bench/bench_faults.py`; here, the cases a change is most likely
to break: duplicate enqueues, a truncated chunk, a deleted chunk, and workers SIGKILLed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_faults  # noqa: E402

SHAPE = 48  # 27 image chunks of 16^3, 8 FFN subvolumes


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    from conftest import make_tiny_ffn

    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_ffn(root / "tiny_ffn")
    result = bench_faults.run_scenario("undisturbed", root, model, SHAPE, None, seed=0)
    assert result["finished"] and result["dead_lettered"] == 0 and result["left"] == 0
    reference = bench_faults.outcome(bench_faults.pipeline_config(root / "undisturbed", model, SHAPE))
    assert reference["objects"]["objects"] > 0 and reference["objects"]["meshes"]
    return root, model, reference


def test_enqueueing_every_batch_twice_gives_the_same_layers(undisturbed):
    root, model, reference = undisturbed
    result = bench_faults.run_scenario("enqueue-twice", root, model, SHAPE, reference, seed=0)
    assert result["passed"] and result["identical_to_undisturbed"], result
    assert result["max_executions_of_one_task"] == 2  # each task ran once per copy, none looped


def test_sigkilled_workers_are_replaced_and_the_result_is_unchanged(undisturbed):
    root, model, reference = undisturbed
    result = bench_faults.run_scenario("sigkill", root, model, SHAPE, reference, seed=1)
    assert result["faults_injected"] > 0
    assert result["passed"] and result["identical_to_undisturbed"] and result["dead_lettered"] == 0, result


def test_damaged_input_is_reported_and_its_tasks_dead_lettered_with_the_reason(undisturbed):
    root, model, reference = undisturbed
    result = bench_faults.run_scenario("truncate", root, model, SHAPE, reference, seed=0)
    assert not result["finished"] and result["passed"], result
    chunk = result["damaged_chunk"].split("/")[-1]
    assert result["dead_lettered"] >= 1 and any("damaged" in r and chunk in r for r in result["reasons"])
    assert [d.split("/")[-1] for d in result["verify"]["damaged"]] == [chunk]
    assert result["left"] == 0


def test_a_chunk_deleted_from_a_finished_stages_output_makes_the_rerun_redo_that_stage(undisturbed):
    """The resumed run checks a completed stage's recorded outputs before skipping it: the ingest
    whose chunk was deleted runs again, and the run ends identical to the undisturbed one."""
    root, model, reference = undisturbed
    result = bench_faults.run_scenario("delete", root, model, SHAPE, reference, seed=0)
    assert result["finished"] and result["passed"], result  # passed: identical to the undisturbed run
    assert result["verify"]["missing"] == [] and result["left"] == 0


def test_a_decodable_garble_of_a_raw_chunk_is_caught_by_its_checksum(undisturbed):
    root, model, reference = undisturbed
    result = bench_faults.run_scenario("garble-raw", root, model, SHAPE, reference, seed=0)
    assert result["passed"], result
    assert [d.split("/")[-1] for d in result["verify"]["damaged"]] == [result["damaged_chunk"].split("/")[-1]]


def test_a_hung_task_is_timed_out_and_dead_lettered_instead_of_holding_the_run(undisturbed):
    root, model, reference = undisturbed
    result = bench_faults.run_scenario("hang", root, model, SHAPE, reference, seed=0)
    assert result["passed"] and result["faults_injected"] == 1, result
    assert result["stopped_at"] == "stage segment.initial"
    assert result["detect_seconds"] < 120, result


def test_a_compresso_chunk_that_crashes_its_decoder_fails_its_task_by_name(undisturbed):
    root, model, _ = undisturbed
    result = bench_faults.run_scenario("compresso", root, model, SHAPE, None, seed=0)
    assert result["passed"], result
