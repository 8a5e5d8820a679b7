"""Surrogate kinds (registered through ``blockprune_register_surrogates``) and swapping a block for one."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..discovery.flops import affine_flops
from ..discovery.spec import Block
from ..hookspecs import hookimpl
from ..plan import ReplacedBlock, StreamReport
from .fit import fit_affine
from .recording import record_block, record_blocks
from .surrogate import LinearSurrogate


def fit_surrogate(
    model: nn.Module, block: Block, batches: list[dict[str, Any]], ridge: float = 1e-6, device: Any = None
) -> tuple[LinearSurrogate, dict[str, StreamReport]]:
    """Record ``block``'s streams on ``batches`` and fit its surrogate by least squares."""
    return _fitted(model, block, record_block(model, block, batches, device=device), ridge)


def fit_surrogates(
    model: nn.Module, blocks: list[Block], batches: list[dict[str, Any]], ridge: float = 1e-6, device: Any = None
) -> dict[str, tuple[LinearSurrogate, dict[str, StreamReport]]]:
    """:func:`fit_surrogate` for several blocks of the intact model, recorded in one pass over ``batches``."""
    recorded = record_blocks(model, blocks, batches, device=device)
    return {block.name: _fitted(model, block, recorded[block.name], ridge) for block in blocks}


def _fitted(model: nn.Module, block: Block, accumulators: dict, ridge: float) -> tuple[LinearSurrogate, dict]:
    surrogate = LinearSurrogate.for_block(model.get_submodule(block.name), block.spec, block.stream_dims)
    reports = {}
    for stream, accumulator in accumulators.items():
        fit = fit_affine(accumulator, ridge, name=f"{block.name}/{stream}")
        surrogate.set_affine(stream, fit.weight, fit.bias)
        reports[stream] = StreamReport(accumulator.dim, fit.relative_error, fit.condition_number, fit.tokens,
                                       affine_flops(block.stream_shapes[stream]))
    return surrogate, reports


def identity_surrogate(model: nn.Module, block: Block) -> tuple[LinearSurrogate, dict[str, StreamReport]]:
    """``Y = X``: the block's residual branch skipped (block deletion, the baseline BRLL is compared with).

    Its maps stay zero (sandwich training leaves them so); the fit error of ``Y = X`` is 1 by definition.
    """
    surrogate = LinearSurrogate.for_block(model.get_submodule(block.name), block.spec, block.stream_dims)
    reports = {stream: StreamReport(block.stream_dims[stream], 1.0, float("nan"), 0, affine_flops(block.stream_shapes[stream]))
               for stream in block.stream_dims}
    return surrogate, reports


class SurrogateKind:
    """A kind of stand-in for a replaced block; ``compress(surrogate=name)`` picks one by its ``name``.

    :meth:`build` returns a :class:`LinearSurrogate` (which ``from_pretrained`` rebuilds from its weights)
    and its per-stream fit reports. ``trainable`` says whether sandwich training may train its maps.
    """

    name: str = ""
    trainable: bool = True

    def build(
        self, model: nn.Module, block: Block, batches: list[dict[str, Any]], ridge: float, device: Any
    ) -> tuple[LinearSurrogate, dict[str, StreamReport]]:
        """The surrogate for ``block`` of ``model`` (as it is now), fitted on ``batches`` if the kind fits."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class LinearKind(SurrogateKind):
    """BRLL: ``Y = X + W X + b`` per stream, fitted by least squares."""

    name = "linear"

    def build(self, model, block, batches, ridge, device):
        return fit_surrogate(model, block, batches, ridge, device)


class IdentityKind(SurrogateKind):
    """``Y = X``: the block deleted, the baseline BRLL is compared with; sandwich training leaves it so."""

    name = "identity"
    trainable = False

    def build(self, model, block, batches, ridge, device):
        return identity_surrogate(model, block)


@hookimpl
def blockprune_register_surrogates(register) -> None:
    register(LinearKind())
    register(IdentityKind())


def replace_block(
    model: nn.Module,
    block: Block,
    batches: list[dict[str, Any]],
    ridge: float = 1e-6,
    device: Any = None,
    surrogate: str = "linear",
) -> ReplacedBlock:
    """Put a surrogate of kind ``surrogate`` in ``block``'s place, built on the model as it is now."""
    from .. import plugins

    module, reports = plugins.get_surrogate(surrogate).build(model, block, batches, ridge, device)
    model.set_submodule(block.name, module)
    return ReplacedBlock(block.name, block.kind, block.spec.to_dict(), reports)
