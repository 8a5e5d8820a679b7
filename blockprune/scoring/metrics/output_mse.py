"""The ``output_mse`` metric: one-step output distortion when a block's residual branch is skipped."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ...discovery.spec import Block
from ...hookspecs import hookimpl
from ...runtime.forward import forward_batch, output_tensor
from ..base import Metric, ScoringContext
from ..prefix import Prefix


class OutputMSE(Metric):
    """Relative squared error of the model's output on the calibration inputs: ``Σ‖ŷ − y‖² / Σ‖y‖²``.

    The calibration batches carry their own timesteps, so the error is averaged over the denoising
    steps they were sampled at. Where the model is a chain of blocks, the forwards skip the blocks before the
    ablated one (:mod:`blockprune.scoring.prefix`).
    """

    name = "output_mse"
    higher_is_better = False
    cost = "forward"

    def prepare(self, context: ScoringContext) -> tuple[list[torch.Tensor], Prefix]:
        """The intact model's outputs on the scoring batches, and the blocks' inputs to replay."""
        outputs = [output_tensor(forward_batch(context.model, b, i)).float() for i, b in enumerate(context.batches)]
        return outputs, Prefix(context.model, context.blocks, context.batches)

    def evaluate(self, context: ScoringContext, block: Block, state: Any) -> float:
        outputs, prefix = state
        replay = prefix.exact and block.name in prefix.position
        if replay:
            prefix.advance(block)
        error = reference = 0.0
        for index, (batch, expected) in enumerate(zip(context.batches, outputs)):
            with prefix.replayed(block, index) if replay else contextlib.nullcontext():
                got = output_tensor(forward_batch(context.model, batch, index)).float()
            error += float(((got - expected) ** 2).sum())
            reference += float((expected**2).sum())
        return error / reference if reference > 0 else error


@hookimpl
def blockprune_register_metrics(register) -> None:
    register(OutputMSE())
