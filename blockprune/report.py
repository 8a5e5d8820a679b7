"""The plan, stages, selection and calibration tables (the progress bars are in :mod:`.progress`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .plan import Plan
from .progress import progress_bars  # noqa: F401 - where callers found it before progress.py
from .sandwich.heal_check import CONFIDENCE_Z, beats_on_both_halves


def format_count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


def _ratio(after: float | None, before: float | None) -> str:
    return f" ({after / before:.1%})" if after is not None and before else ""


def plan_table(plan: Plan) -> Table:
    """The plan as a rich table: one row per replaced block, totals in the caption."""
    table = Table(
        title=f"blockprune plan: {len(plan.replaced)} of {len(plan.blocks)} blocks "
        f"{'deleted (Y = X)' if plan.surrogate == 'identity' else 'replaced'} ({plan.adapter})",
        box=box.SIMPLE,
    )
    for column in ("#", "block", "stream", "importance", "fit error", "cond."):
        table.add_column(column, justify="left" if column in ("block", "stream") else "right", no_wrap=True)
    for index, block in enumerate(plan.replaced, 1):
        for position, (stream, report) in enumerate(block.streams.items()):
            first = position == 0
            score = "-" if block.score is None else f"{block.score:.4f}"
            table.add_row(
                str(index) if first else "",
                block.name if first else "",
                stream,
                score if first else "",
                f"{report.relative_error:.4f}",
                f"{report.condition_number:.3g}",
            )
    table.caption = (
        f"parameters {format_count(plan.params_before)} → {format_count(plan.params_after)}"
        f"{_ratio(plan.params_after, plan.params_before)}; FLOPs {format_count(plan.flops_before)} → "
        f"{format_count(plan.flops_after)}{_ratio(plan.flops_after, plan.flops_before)}"
        + (f"; workdir {plan.workdir_bytes / 1e6:.1f} MB" if plan.workdir_bytes is not None else "")
    )
    if plan.fused:
        table.caption += f"; fused: {', '.join(f'{run.stream} of {len(run.blocks)} blocks' for run in plan.fused)}"
    return table


def stages_table(plan: Plan) -> Table:
    """Sandwich stages: span, loss and relative span error on held-out batches before and after training."""
    table = Table(title="sandwich training (held-out batches)", box=box.SIMPLE)
    # two-line headers and unwrapped names: the table fits 120 columns with FLUX's longest block names
    for column in ("#", "block", "span", "rel. error\nbefore", "rel. error\nafter", "kept\nstep", "rate",
                   "peak\nGPU"):
        table.add_column(column, justify="left" if column in ("block", "span") else "right", no_wrap=True)
    for index, stage in enumerate(plan.stages, 1):
        peak = "-" if stage.peak_memory_bytes is None else f"{stage.peak_memory_bytes / 2**30:.2f} GiB"
        table.add_row(
            str(index), stage.block, f"{len(stage.span)} blocks, LoRA on {len(stage.lora_blocks)}",
            f"{stage.relative_error_before:.4f}", f"{stage.relative_error_after:.4f}", _kept(stage.best_step, stage.steps_run),
            "-" if stage.lr is None else f"{stage.lr:g}", peak,
        )
    if plan.heal:
        heal = plan.heal
        table.caption = (f"healing: held-out output error {heal['relative_error_before']:.4g} → "
                         f"{heal['relative_error_after']:.4g}, kept step "
                         f"{_kept(heal['best_step'], heal['steps_run'])}"
                         + (" (after its cool-down)" if heal.get("cooled") else "")
                         + _refusal(heal)
                         + ("" if heal["lr"] is None else f", rate {heal['lr']:g}")
                         + (", kept blocks trained in full" if heal.get("kept") == "full" else "")
                         + (", trained on its own trajectories" if heal.get("states") == "trajectory" else "")
                         + _guided(heal.get("guidance_scale", 1.0)))
    return table


def _refusal(heal: dict) -> str:
    """Why the guard put the start back although training had beaten it on the check; nothing if it did not."""
    if not heal.get("refused"):
        return ""
    if beats_on_both_halves(heal["halves_after"], heal["halves_before"]):
        z = heal.get("fresh_z")
        within = "" if not z else f": signed-rank z {z:.2f}, below -{CONFIDENCE_Z} needed"
        return f" (refused: its gain on fresh noise was within the noise{within})"
    return " (refused: it won in sum, not on both halves of the check)"


def _kept(best_step: int | None, steps_run: int | None) -> str:
    """The guard's kept step of the steps run; "reverted" when training never beat the starting weights."""
    if best_step is None:
        return "-"
    return "reverted" if best_step == 0 else f"{best_step}/{steps_run}"


def _guided(scale: float) -> str:
    """", guided at scale 2" for a check guided against the empty prompt; nothing for an unguided one."""
    return "" if scale == 1 else f", guided at scale {scale:g}"


def selection_table(plan: Plan) -> Table:
    """importance="auto": each candidate plan's relative output error on the held-out batches, best first."""
    selection = plan.selection
    checked = {"images": "sampled images", "trajectory": "a latent trajectory from",
               "outputs": "the one-step outputs of"}.get(selection.get("checked_on"), "the outputs of")
    title = (f"block selection (importance='auto'): the plan's blocks fitted on {selection['fit_batches']} batches, "
             f"checked on {checked}" + ("" if checked == "sampled images" else f" {selection['held_batches']} held out")
             + _guided(selection.get("guidance_scale", 1.0)))
    finalists, steps = selection.get("finalists") or {}, selection.get("steps")
    short = "held-out rel. error" + ("" if steps is None or checked == "the one-step outputs of" else f", {steps} steps")
    table = Table(title=title, box=box.SIMPLE)
    columns = ("candidate", short) + ((f"re-checked, {selection['final_steps']} steps",) if finalists else ()) + ("",)
    for column in columns:
        table.add_column(column, justify="left" if column in ("candidate", "") else "right")
    for name, error in sorted(selection["candidates"].items(), key=lambda item: item[1]):
        again = (f"{finalists[name]:.4g}" if name in finalists else "-",) if finalists else ()
        table.add_row(name, f"{error:.4g}", *again, "chosen" if name == selection["chosen"] else "")
    return table


def _shape(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return " × ".join(map(str, value.shape)) or "scalar"
    if isinstance(value, Mapping):
        return f"dict of {len(value)}"
    return repr(value) if len(repr(value)) <= 24 else type(value).__name__


def calibration_table(batches: list[dict[str, Any]], descriptions: Mapping[str, str], title: str) -> Table:
    """One row per key of the first batch: its shape (or value), dtype and what it holds (``descriptions``)."""
    table = Table(title=title, box=box.SIMPLE)
    for column in ("key", "shape / value", "dtype", "what it holds"):
        table.add_column(column, no_wrap=column != "what it holds")
    for key, value in batches[0].items():
        dtype = str(value.dtype).removeprefix("torch.") if hasattr(value, "dtype") else "-"
        table.add_row(key, _shape(value), dtype, descriptions.get(key, ""))
    return table


def output_console() -> Console:
    """A console for tables: 120 columns wide when output is not a terminal, so logs keep full names."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def print_plan(plan: Plan) -> None:
    """Print the plan table, and the sandwich stages if there were any."""
    console = output_console()
    console.print(plan_table(plan))
    if plan.selection:
        console.print(selection_table(plan))
    if plan.stages:
        console.print(stages_table(plan))
