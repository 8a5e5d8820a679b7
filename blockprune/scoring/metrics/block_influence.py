"""The ``block_influence`` metric: ``1 − cos(X, Y)`` between a block's input and output streams."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...brll.recording import stream_pairs
from ...discovery.signature import bind_inputs
from ...discovery.spec import Block
from ...hookspecs import hookimpl
from ...runtime.forward import forward_batch
from ...runtime.hooks import attached
from ..base import Metric, ScoringContext


class BlockInfluence(Metric):
    """Mean over tokens (and streams) of ``1 − cos(x, y)`` (ShortGPT's block influence); no ablation needed.

    Higher means the block changes its input more, so skipping it hurts more: lower is better as a
    measure of the damage of removing it.
    """

    name = "block_influence"
    higher_is_better = False
    cost = "forward"
    ablates = False

    def prepare(self, context: ScoringContext) -> dict[str, float]:
        """One pass over the scoring batches with every block watched."""
        sums = {b.name: [0.0, 0] for b in context.blocks}

        def make_hook(block: Block):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                for _, x, y in stream_pairs(block, bind_inputs(module, args, kwargs), output):
                    cosine = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
                    sums[block.name][0] += float((1 - cosine).sum())
                    sums[block.name][1] += cosine.numel()

            return hook

        with attached(context.model, {b.name: make_hook(b) for b in context.blocks}):
            for index, batch in enumerate(context.batches):
                forward_batch(context.model, batch, index)
        return {name: total / max(count, 1) for name, (total, count) in sums.items()}

    def evaluate(self, context: ScoringContext, block: Block, state: Any) -> float:
        return state[block.name]


@hookimpl
def blockprune_register_metrics(register) -> None:
    register(BlockInfluence())
