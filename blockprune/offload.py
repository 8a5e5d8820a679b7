"""CPU offload: the blocks live on the CPU and visit the accelerator only while they run or train."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks


class Offload:
    """Inside ``with Offload(model, blocks, device)``: every part of ``model`` outside the blocks sits on
    ``device``; each block moves there for its forward and back to the CPU after it, unless pinned.

    This keeps one block (plus what is pinned, e.g. a sandwich span) on the accelerator at a time, so a
    24 GB card can compress FLUX.1-dev. On exit the whole model is back on the CPU.
    """

    def __init__(self, model: nn.Module, blocks: Iterable[str], device: torch.device | str) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.pinned_names: set[str] = set()
        self.moving: set[int] = set()
        self.stash: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles: list[Any] = []

    def refresh(self) -> None:
        """Look the blocks up again (a surrogate may stand where a block was); done at every model forward."""
        self.moving = {id(self.model.get_submodule(n)) for n in self.blocks if n not in self.pinned_names}

    def _pre(self, module: nn.Module, args: Any) -> None:
        if module is self.model:
            self.refresh()
        elif id(module) in self.moving:
            if torch.is_grad_enabled():
                module.to(self.device)
                return
            # inference: keep the CPU tensors and only point the parameters at device copies for this call
            self.stash[id(module)] = [(t, t.data) for t in (*module.parameters(), *module.buffers())]
            for tensor, data in self.stash[id(module)]:
                tensor.data = data.to(self.device, non_blocking=True)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in self.moving:
            stashed = self.stash.pop(id(module), None)
            if stashed is None:
                module.to("cpu")
                return
            for tensor, data in stashed:
                tensor.data = data

    def _outside_blocks(self) -> Iterator[nn.Module]:
        prefixes = tuple(f"{name}." for name in self.blocks)
        for name, module in self.model.named_modules():
            if name not in self.blocks and not name.startswith(prefixes):
                yield module

    def __enter__(self) -> Offload:
        self.model.to("cpu")
        for module in self._outside_blocks():
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(self.device)
            for key, buffer in module.named_buffers(recurse=False):
                module._buffers[key] = buffer.to(self.device)
        self.refresh()
        self.handles = [
            module_hooks.register_module_forward_pre_hook(self._pre),
            module_hooks.register_module_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.to("cpu")

    @contextlib.contextmanager
    def pinned(self, names: Iterable[str]) -> Iterator[None]:
        """Keep the blocks ``names`` on the accelerator for the ``with`` body (e.g. while a span trains)."""
        names = [n for n in names if n not in self.pinned_names]
        self.pinned_names.update(names)
        for name in names:
            self.model.get_submodule(name).to(self.device)
        self.refresh()
        try:
            yield
        finally:
            self.pinned_names.difference_update(names)
            for name in names:  # the module at a name may have been swapped or merged meanwhile
                self.model.get_submodule(name).to("cpu")
            self.refresh()
