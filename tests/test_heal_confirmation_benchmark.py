"""benchmarks/heal_confirmation.py and heal_confirmation_sizes.py: the verdicts of smaller confirmations, read from the
first samples of one run, and what each size keeps."""

import argparse
import json

from conftest import benchmark_script


def test_a_smaller_confirmation_is_the_first_whole_draws_of_the_held_out_batches():
    fresh_sizes = benchmark_script("heal_confirmation").fresh_sizes
    # 32 batches of 8: 6 held out, 48 samples a draw; 16 batches of 4: 3 held out, 12 a draw
    assert fresh_sizes(argparse.Namespace(calibration=32, batch_size=8, seed=0), [32, 64, 128]) == {32: 48, 64: 96,
                                                                                                  128: 144}
    assert fresh_sizes(argparse.Namespace(calibration=16, batch_size=4, seed=0), [32, 64]) == {32: 36, 64: 72}
    # 100 batches of 4: 20 held out; the rule before draws the check's 8 once (32), 64 draws 16 batches, 128 all 20
    # twice
    assert fresh_sizes(argparse.Namespace(calibration=100, batch_size=4, seed=0), [32, 64, 128]) == {32: 32, 64: 64,
                                                                                                   128: 160}


def _run(folder, name, z32, z64, image_change):
    changes = [image_change - 1, image_change + 1]  # a mean of image_change, a standard error of 1
    run = {"model": name, "ratio": 0.2, "seed": 0, "best_step": 50, "steps_run": 80,
           "psnr_change": {"mean": image_change, "std": 2 ** 0.5, "n": 2, "changes": changes},
           "fresh_by_size": {"32": {"signed_rank_z": z32, "n": 48}, "64": {"signed_rank_z": z64, "n": 96}}}
    (folder / f"heal-confirmation-{name}.json").write_text(json.dumps(run))


def test_each_size_keeps_the_heals_its_test_confirms_and_counts_their_image_change(tmp_path):
    _run(tmp_path, "a", -2.0, -3.0, 0.5)  # kept by both
    _run(tmp_path, "b", -1.0, -2.0, 0.3)  # kept only by the larger confirmation
    _run(tmp_path, "c", -0.5, -1.7, -0.2)  # a loss the larger one lets through
    summary = benchmark_script("heal_confirmation_sizes").summarise(
        benchmark_script("heal_confirmation_sizes").load([tmp_path]))
    assert summary["sizes"] == [32, 64]
    by_name = {r["model"]: r for r in summary["runs"]}
    assert by_name["b"]["kept"] == {32: False, 64: True} and by_name["b"]["gain"] == {32: 0.0, 64: 0.3}
    assert by_name["a"]["image_se"] == 1.0
    overall = summary["overall"]
    assert overall[32]["kept"] == 1 and overall[64]["kept"] == 3
    assert overall[32]["losses_kept"] == 0 and overall[64]["losses_kept"] == 1 and overall[64]["worst_kept"] == -0.2
    assert round(overall[64]["mean_gain_over_cells"], 6) == round((0.5 + 0.3 - 0.2) / 3, 6)  # three cells of one run
