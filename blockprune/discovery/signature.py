"""The forward signature a block is called with, and binding a call's arguments to it."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def forward_signature(module: nn.Module) -> inspect.Signature:
    """The signature a module is called with (a surrogate's is the one of the block it replaces)."""
    return getattr(module, "forward_signature", None) or inspect.signature(module.forward)


def bind_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map a call's positional and keyword arguments to the forward's parameter names."""
    return forward_signature(module).bind_partial(*args, **kwargs).arguments
