"""Progress on every long step (#20 item 2): bars in the order the work runs, cached scores say so, a log off a
terminal, warnings through the console."""

import inspect
import io
import logging
import warnings

from rich.console import Console

import blockprune
from blockprune.errors import IllConditionedWarning
from blockprune.plan import Plan, StageReport
from blockprune.progress import mark_cached, progress_bars
from blockprune.report import stages_table
from blockprune.toy.small_models import small_model


def _console(terminal):
    return Console(file=io.StringIO(), force_terminal=terminal, width=120, color_system=None)


def test_off_a_terminal_each_bar_logs_its_start_progress_and_end():
    console = _console(False)
    with progress_bars(True, console) as bars:
        bars.interval = 0  # a line at every step (30 s apart by default)
        task = bars.add_task("recording calibration", total=3)
        for _ in range(3):
            bars.advance(task)
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "recording calibration: started (0/3)"
    assert lines[1].startswith("recording calibration: 1/3, ")  # with the time elapsed (and left, once known)
    assert lines[-1].startswith("recording calibration: done, 3/3 in ")
    assert "━" not in console.file.getvalue()  # no bar drawing in a log


def test_progress_off_prints_nothing():
    console = _console(False)
    with progress_bars(False, console) as bars:
        bars.advance(bars.add_task("scoring blocks", total=2), 2)
        logging.getLogger("blockprune").warning("not shown through the console")
    assert console.file.getvalue() == ""


def test_on_a_terminal_warnings_and_log_messages_print_through_the_console():
    console = _console(True)
    with progress_bars(True, console) as bars:
        bars.add_task("fitting", total=1)
        warnings.warn("the inputs span only 5 of 17 dimensions", IllConditionedWarning)
        logging.getLogger("blockprune").warning("score cache entry damaged")
    text = console.file.getvalue()
    assert "warning: IllConditionedWarning: the inputs span only 5 of 17 dimensions" in text
    assert "warning: score cache entry damaged" in text
    assert "warnings.warn(" not in text and ".py:" not in text  # not the raw file:line form
    assert not any(type(h).__name__ == "_ConsoleHandler" for h in logging.getLogger("blockprune").handlers)


def test_bars_left_short_by_a_fully_cached_scoring_say_cached():
    with progress_bars(False) as bars:
        earlier = set(bars.task_ids)
        task = bars.add_task("scoring blocks", total=4)
        mark_cached(bars, earlier, cached=["fit_residual"], metrics=["fit_residual", "output_mse"])
        assert bars.tasks[0].description == "scoring blocks" and not bars.tasks[0].finished  # one was computed
        mark_cached(bars, earlier, cached=["fit_residual"], metrics=["fit_residual"])
    assert bars.tasks[task].description == "scoring blocks (cached)" and bars.tasks[task].finished


def test_compress_bars_run_in_order_and_a_cached_scoring_says_so(tmp_path, capsys):
    toy = small_model("flux-random")
    batches = toy.calibration(toy.build(), 3, 0)
    options = {"adapter": "flux", "ratio": 0.1, "calibration": batches, "sandwich": False, "importance": "fit_residual",
               "cache_dir": tmp_path / "cache"}
    blockprune.compress(toy.build(), **options)
    started = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.endswith("started (0/2)")
               or ": started (" in line]
    assert started[:3] == ["counting FLOPs (whole model, each block)", "scoring blocks", "replacing blocks"]
    blockprune.compress(toy.build(), **options)
    out = capsys.readouterr().out
    assert "scoring blocks (cached): done, 20/20" in out


def test_the_sandwich_table_fits_120_columns():
    parameters = inspect.signature(StageReport).parameters
    names = [f"single_transformer_blocks.{i}" for i in (12, 13, 14)]
    values = {"block": names[1], "span": names, "lora_blocks": [names[0], names[2]], "trained_surrogates": [names[1]],
              "steps": 100, "loss_before": 0.001072, "loss_after": 0.000981, "relative_error_before": 0.0123,
              "relative_error_after": 0.0101, "seconds": 1.0, "peak_memory_bytes": 3 * 2**30}
    plan = Plan("flux", 0.2, "importance", names)
    plan.stages = [StageReport(**{k: v for k, v in values.items() if k in parameters})]
    console = _console(False)
    console.print(stages_table(plan))
    rows = [line for line in console.file.getvalue().splitlines() if names[1] in line]
    assert len(rows) == 1 and "3 blocks, LoRA on 2" in rows[0] and "3.00 GiB" in rows[0]  # one whole line


def test_each_sandwich_stage_and_healing_has_a_bar_with_its_held_out_error(capsys):
    toy = small_model("flux-random")
    batches = toy.calibration(toy.build(), 6, 0)
    blockprune.compress(toy.build(), adapter="flux", ratio=0.1, calibration=batches, order="start2end",
                        sandwich_steps=4, sandwich_lr=1e-4, sandwich_eval_every=2, heal_steps=2, cache_dir=False)
    lines = capsys.readouterr().out.splitlines()
    stages = [line for line in lines if line.startswith("sandwich training of block") and ": done" in line]
    assert len(stages) == 2 and all("held-out error" in line for line in stages)  # one bar per stage
    assert any(line.startswith("global healing: held-out error") and ": done" in line for line in lines)
