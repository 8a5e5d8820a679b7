"""``blockprune inspect``: a model's residual blocks, streams, parameters and FLOPs as a table."""

from __future__ import annotations

import argparse

from rich import box
from rich.table import Table

from .. import plugins
from ..calibration import bundled_prompts, record_pipeline_calibration
from ..config import defaults
from ..discovery.flops import count_flops, count_parameters
from ..discovery.inspection import BlockInfo, inspect
from ..plan import PLAN_ATTRIBUTE, plan, transformer_of
from ..report import format_count, output_console, plan_table, selection_table
from .options import (
    add_calibration_arguments,
    add_model_arguments,
    call_options,
    load_model,
)


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the command."""
    parser = commands.add_parser(
        "inspect", parents=parents, help="list a model's blocks, streams, parameters and FLOPs",
        description="List the residual blocks the adapter finds, verified on one forward pass over the first "
        "calibration batch, with their streams, parameters and FLOPs on that batch.",
    )
    add_model_arguments(parser)
    add_calibration_arguments(parser)
    parser.set_defaults(run=run)


def blocks_table(blocks: list[BlockInfo], model_parameters: int, model_flops: int, adapter: str) -> Table:
    """One row per block; totals of the blocks against the whole model in the caption."""
    table = Table(title=f"{len(blocks)} residual blocks ({adapter} adapter)", box=box.SIMPLE)
    for column in ("#", "block", "kind", "streams", "parameters", "FLOPs"):
        table.add_column(column, justify="left" if column in ("block", "kind", "streams") else "right")
    for index, block in enumerate(blocks, 1):
        streams = ", ".join(f"{name} {'×'.join(map(str, shape))}" for name, shape in block.streams.items())
        table.add_row(str(index), block.name, block.kind, streams, format_count(block.parameters), format_count(block.flops))
    block_parameters = sum(b.parameters for b in blocks)
    block_flops = sum(b.flops for b in blocks)
    table.caption = (
        f"blocks hold {format_count(block_parameters)} of {format_count(model_parameters)} parameters "
        f"({block_parameters / max(model_parameters, 1):.1%}) and cost {format_count(block_flops)} of "
        f"{format_count(model_flops)} FLOPs per forward on this batch ({block_flops / max(model_flops, 1):.1%})"
    )
    return table


def run(args: argparse.Namespace) -> int:
    """Print the blocks table (and the plan of a compressed model)."""
    loaded = load_model(args, count=1)
    transformer = transformer_of(loaded.model)
    console = output_console()
    if hasattr(transformer, PLAN_ATTRIBUTE):
        console.print(plan_table(plan(transformer)))
        if plan(transformer).selection:
            console.print(selection_table(plan(transformer)))
        if loaded.batches is None:
            console.print("pass --calibration FILE to list its blocks as well")
            return 0
    loaded.check_calibration()
    adapter = plugins.get_adapter(transformer, args.adapter)
    if loaded.batches is not None:
        batch = loaded.batches[0]
    else:
        steps = args.calibration_steps or defaults()["calibration_steps"]
        batch = record_pipeline_calibration(loaded.model, adapter, (loaded.prompts or bundled_prompts())[:1], steps, 1,
                                            pipeline_options=call_options(args))[0]
    blocks = inspect(transformer, adapter.name, batch)
    console.print(blocks_table(blocks, count_parameters(transformer), count_flops(transformer, batch), adapter.name))
    return 0
