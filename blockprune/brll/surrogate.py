"""The linear surrogate: a drop-in module that replaces a block's residual branch by an affine map."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..discovery.spec import BlockSpec
from ..errors import BlockpruneError
from .registry import register_block


class LinearSurrogate(nn.Module):
    """``Y_s = X_s + W_s X_s + b_s`` for every residual stream ``s`` of the block it replaces.

    It takes the replaced block's forward signature and returns the same structure, so the host
    model's forward code runs unchanged; context inputs (``temb``, rotary embeddings, ...) are ignored.
    Streams missing from ``stream_dims`` get no map and pass through unchanged (``Y_s = X_s``): after
    :func:`blockprune.fuse`, the first surrogate of a run carries the run's whole map.
    """

    def __init__(
        self,
        spec: BlockSpec,
        signature: inspect.Signature,
        stream_dims: dict[str, int],
        replaces: str = "",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(stream_dims) - set(spec.streams))
        if unknown:
            raise BlockpruneError(
                f"stream {unknown[0]!r} is not a stream of the replaced block; its streams: {spec.streams}"
            )
        self.spec = spec
        self.forward_signature = signature
        self.replaces = replaces
        # where each stream sits among the positional parameters, worked out once: binding the signature on every
        # call would break torch.compile's graph
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        order = [p.name for p in signature.parameters.values() if p.kind in positional]
        self.stream_positions = {s: order.index(s) if s in order else None for s in spec.streams}
        self.linears = nn.ModuleDict(
            {
                s: nn.Linear(stream_dims[s], stream_dims[s], dtype=dtype, device=device)
                for s in spec.streams
                if s in stream_dims
            }
        )

    @classmethod
    def for_block(cls, block: nn.Module, spec: BlockSpec, stream_dims: dict[str, int]) -> LinearSurrogate:
        """A zero-initialised surrogate (``Y = X``) for ``block``, keeping its ``kept_submodules``."""
        parameter = next(block.parameters(), None)
        surrogate = surrogate_class(type(block), cls, spec)(
            spec,
            inspect.signature(block.forward),
            stream_dims,
            replaces=type(block).__name__,
            dtype=parameter.dtype if parameter is not None else None,
            device=parameter.device if parameter is not None else None,
        )
        with torch.no_grad():
            for linear in surrogate.linears.values():
                linear.weight.zero_()
                linear.bias.zero_()
        for path in spec.kept_submodules:
            surrogate.keep_submodule(path, block.get_submodule(path))
        return surrogate

    def keep_submodule(self, path: str, module: nn.Module) -> None:
        """Carry ``module`` at dotted ``path`` (relative to the replaced block) on this surrogate."""
        *parents, last = path.split(".")
        host: nn.Module = self
        for part in parents:
            if not hasattr(host, part):
                host.add_module(part, nn.Module())
            host = getattr(host, part)
        host.add_module(last, module)

    def set_affine(self, stream: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load ``W_s`` and ``b_s`` (any float dtype; cast to the surrogate's)."""
        linear = self.linears[stream]
        with torch.no_grad():
            linear.weight.copy_(weight.to(linear.weight))
            linear.bias.copy_(bias.to(linear.bias))

    def stream_input(self, stream: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """The stream ``stream`` of a call, passed by keyword or by position."""
        if stream in kwargs:
            return kwargs[stream]
        position = self.stream_positions[stream]
        if position is None or position >= len(args):
            raise BlockpruneError(
                f"the surrogate of a {self.replaces or 'block'} was called without its input {stream!r}; call it as "
                f"the replaced block is called, with every residual stream"
            )
        return args[position]

    def forward(self, *args, **kwargs):
        def stream_out(stream: str) -> torch.Tensor:
            x = self.stream_input(stream, args, kwargs)
            if stream not in self.linears:
                return x
            linear = self.linears[stream]  # float32 while trained beside a bf16 / fp16 model (no autocast on CPU)
            return x + linear(x.to(linear.weight.dtype)).to(x.dtype)

        if isinstance(self.spec.outputs, str):
            return stream_out(self.spec.outputs)
        return tuple(None if s is None else stream_out(s) for s in self.spec.outputs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            replaced = self.__dict__.get("replaces") or "block"
            raise AttributeError(
                f"the model reads {name!r} of a replaced {replaced} (now a LinearSurrogate); the model's adapter must "
                f"keep it on the surrogate with BlockSpec(kept_submodules=...)"
            ) from None

    def extra_repr(self) -> str:
        passed = [s for s in self.spec.streams if s not in self.linears]
        through = f", passes through={passed}" if passed else ""
        return f"replaces={self.replaces}, streams={list(self.linears)}{through}"


_CLASSES: dict[tuple[type, type], type] = {}


def surrogate_class(block_class: type, base: type = LinearSurrogate, spec: BlockSpec | None = None) -> type:
    """The subclass of ``base`` that stands in for ``block_class`` (one per replaced class, made once).

    Its ``forward`` shows the replaced block's signature, and it is registered in diffusers' block registry with
    that block's metadata (for a class diffusers does not know, metadata read off ``spec``), so that diffusers' block caches (FirstBlockCache, MagCache) treat it as the block.
    """
    if "replaced_class" in base.__dict__:  # already a stand-in class: make the sibling, not a grandchild
        base = base.__mro__[1]
    key = (block_class, base)
    if key not in _CLASSES:
        def forward(self, *args, **kwargs):
            return base.forward(self, *args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(block_class.forward)
        except (TypeError, ValueError):  # a forward without a signature keeps the generic one
            pass
        attributes = {"forward": forward, "replaced_class": block_class, "__module__": base.__module__,
                      "__doc__": f"A {base.__name__} standing in for a {block_class.__name__}."}
        cls = type(base.__name__, (base,), attributes)
        register_block(cls, block_class, spec.outputs if spec is not None else None)
        _CLASSES[key] = cls
    return _CLASSES[key]
