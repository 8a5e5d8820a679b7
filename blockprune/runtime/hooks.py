"""Attaching forward hooks (with keyword arguments) to submodules for the length of a ``with`` block."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

from torch import nn


@contextlib.contextmanager
def attached(model: nn.Module, hooks: Mapping[str, Callable], pre: bool = False) -> Iterator[None]:
    """Register ``hooks[path]`` on the submodule at each path (forward pre-hooks with ``pre``), then remove them."""
    handles = []
    try:
        for path, hook in hooks.items():
            module = model.get_submodule(path)
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
