"""A 2-process CPU launch (gloo) gives every rank the same model, equal to the single-process run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    single = subprocess.run([sys.executable, str(HERE / "distributed_job.py"), str(folder / "single")],
                            capture_output=True, text=True, cwd=HERE)
    assert single.returncode == 0, single.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(HERE / "distributed_job.py"), str(folder / "multi")]
    multi = subprocess.run(launch, capture_output=True, text=True, cwd=HERE)
    assert multi.returncode == 0, multi.stderr[-3000:]
    load = lambda name: torch.load(folder / f"{name}.pt", weights_only=True)  # noqa: E731
    return load("single-0"), load("multi-0"), load("multi-1")


def test_every_rank_ends_with_the_same_model(runs):
    _, rank0, rank1 = runs
    assert rank0["state"].keys() == rank1["state"].keys()
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])


def test_all_reduced_normal_equations_equal_the_single_process_sums(runs):
    single, multi, _ = runs
    for stream, (ztz, ztr, rr) in single["normal"].items():
        multi_ztz, multi_ztr, multi_rr = multi["normal"][stream]
        torch.testing.assert_close(multi_ztz, ztz, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(multi_ztr, ztr, rtol=1e-12, atol=1e-12)
        assert multi_rr == pytest.approx(rr, rel=1e-12)


def test_scores_choice_and_trained_model_equal_the_single_process_run(runs):
    single, multi, _ = runs
    assert multi["replaced"] == single["replaced"]
    assert multi["scores"] == pytest.approx(single["scores"], rel=1e-6)
    assert multi["losses"] == pytest.approx(single["losses"], rel=1e-4)
    for key, value in single["state"].items():
        torch.testing.assert_close(multi["state"][key], value, rtol=1e-4, atol=1e-6)


def test_healing_split_over_two_processes_equals_the_single_process_run(runs):
    single, multi, _ = runs
    assert single["heal"]["steps"] == 6 and len(single["heal"]["lora_blocks"]) == 2
    assert multi["heal"]["best_step"] == single["heal"]["best_step"]
    for key in ("relative_error_before", "relative_error_after"):
        assert multi["heal"][key] == pytest.approx(single["heal"][key], rel=1e-4)


def test_auto_selection_over_two_processes_checks_every_candidate_as_the_single_process_run(runs):
    single, multi, rank1 = runs
    assert single["selection"]["checked_on"] == "trajectory" and len(single["selection"]["candidates"]) >= 6
    assert multi["selection"]["chosen"] == rank1["selection"]["chosen"] == single["selection"]["chosen"]
    assert multi["selection"]["candidates"] == pytest.approx(single["selection"]["candidates"], rel=1e-4)
