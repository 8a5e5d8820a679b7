"""CPU offload: the blocks live on the CPU and visit the accelerator only while they run or train."""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from ..errors import BlockpruneError
from .prefetch import Prefetcher, module_bytes, module_tensors

_ALIGNMENT = 256  # bytes; every view in a HostBuffer starts on such a boundary


class HostBuffer:
    """Copies of ``tensors`` side by side in one CPU buffer of exactly their size, page-locked in place with
    ``cudaHostRegister`` when ``page_lock`` is set, so copies to a GPU run at full bus speed.

    ``views`` lists the copies in order. Unlike ``Tensor.pin_memory()`` (torch's caching host allocator), nothing
    is rounded up to a power of two. :meth:`release` unlocks the memory; the views stay valid as ordinary CPU
    tensors for as long as anything holds them.
    """

    def __init__(self, tensors: Iterable[torch.Tensor], page_lock: bool = True) -> None:
        tensors = list(tensors)
        offsets, total = [], 0
        for tensor in tensors:
            offsets.append(total)
            total += -(-tensor.nbytes // _ALIGNMENT) * _ALIGNMENT
        self.storage = torch.empty(total, dtype=torch.uint8)
        self.views = []
        for tensor, offset in zip(tensors, offsets):
            view = self.storage[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            self.views.append(view.copy_(tensor))
        self.locked = page_lock and total > 0 and self._register(total)

    def _register(self, nbytes: int) -> bool:
        error = torch.cuda.cudart().cudaHostRegister(self.storage.data_ptr(), nbytes, 0)
        if error != 0:
            warnings.warn(f"offload: could not page-lock {nbytes / 2**20:.0f} MiB of host memory (CUDA error "
                          f"{int(error)}); copies to the GPU will be slower. Free host memory or raise the "
                          "locked-memory limit (ulimit -l) to avoid this.", stacklevel=2)
            return False
        return True

    def release(self) -> None:
        """Unlock the memory (the views remain ordinary CPU tensors)."""
        if self.locked:
            torch.cuda.synchronize()  # no copy from this memory may still be in flight
            torch.cuda.cudart().cudaHostUnregister(self.storage.data_ptr())
            self.locked = False


def _overlapping(tensors: list[torch.Tensor]) -> bool:
    """Whether any two of ``tensors`` share bytes (views of one storage that do not overlap are fine)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors if t.numel())
    return any(start < end for (_, end), (start, _) in zip(spans, spans[1:]))


def gib(nbytes: int) -> str:
    """``nbytes`` as ``1.25 GiB``."""
    return f"{nbytes / 2**30:.2f} GiB"


@dataclass
class _Home:
    """A block as housed by :class:`Offload`: the module, its buffer, and each tensor's view by ``id``."""

    module: nn.Module
    buffer: HostBuffer
    views: dict[int, torch.Tensor]


class Offload:
    """Inside ``with Offload(model, blocks, device)``: every part of ``model`` outside the blocks sits on
    ``device``; each block moves there for its forward and back to the CPU after it, unless pinned.

    This keeps one block (plus what is pinned, e.g. a sandwich span) on the accelerator at a time, so a
    24 GB card can compress FLUX.1-dev. Each block's weights rest in a :class:`HostBuffer`, page-locked when
    ``device`` is a CUDA GPU and ``page_lock`` is set, because these copies bound the speed of offloaded work.
    On exit the whole model is back on the CPU in ordinary memory.

    On a CUDA GPU (with ``prefetch``) the next blocks are copied while one runs
    (:mod:`blockprune.runtime.prefetch`); ``max_gpu_memory`` (bytes) bounds how many. ``visits`` counts block
    runs by ``(phase, "ahead")`` (prefetched) and ``(phase, "waited")`` (copied when the block started), with
    ``phase`` set by the caller.
    """

    def __init__(self, model: nn.Module, blocks: Iterable[str], device: torch.device | str,
                 page_lock: bool = True, prefetch: bool = True, max_gpu_memory: int | None = None) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.device = torch.device(device)
        if max_gpu_memory is not None and self.device.type != "cuda":
            raise BlockpruneError(f"max_gpu_memory bounds the memory of a CUDA GPU, but offload's device is "
                                  f"{self.device}; drop max_gpu_memory or pass device='cuda'")
        self.page_lock = page_lock and self.device.type == "cuda"
        self.prefetch = prefetch and self.device.type == "cuda"
        self.max_gpu_memory = max_gpu_memory
        self.prefetcher: Prefetcher | None = None
        self.phase = "other"
        self.visits: Counter[tuple[str, str]] = Counter()
        self.pinned_names: set[str] = set()
        self.moving: dict[int, nn.Module] = {}
        self.stash: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles: list[Any] = []
        self.homes: dict[str, _Home] = {}
        self.recomputed_backward = False  # set by sandwich.blockwise: forwards with gradients run as in inference

    def refresh(self) -> None:
        """Look the blocks up again (a surrogate may stand where a block was); done at every model forward.

        A block's host buffer stays until exit even while something else stands at its name: scoring swaps
        each block out and back in."""
        modules = (self.model.get_submodule(n) for n in self.blocks if n not in self.pinned_names)
        self.moving = {id(module): module for module in modules}

    def _house(self, name: str) -> None:
        """Move the block ``name``'s weights into a host buffer of their own."""
        module = self.model.get_submodule(name)
        tensors = list({id(t): t for t in (*module.parameters(), *module.buffers())}.values())
        if _overlapping(tensors):
            return  # tensors sharing memory would come apart in a buffer; this block stays in ordinary memory
        buffer = HostBuffer((t.data for t in tensors), page_lock=self.page_lock)
        for tensor, view in zip(tensors, buffer.views):
            tensor.data = view
        self.homes[name] = _Home(module, buffer, {id(t): view for t, view in zip(tensors, buffer.views)})

    def _to_host(self, name: str) -> None:
        """Bring the module at ``name`` back to the CPU: into its host buffer where it has one, so that what
        training changed stays page-locked too."""
        module = self.model.get_submodule(name)
        if self.prefetcher is not None:
            self.prefetcher.settle()  # a copy in flight may still read the host memory written below
        home = self.homes.get(name)
        views = home.views if home is not None and home.module is module else {}
        for tensor in module_tensors(module):
            view = views.get(id(tensor))
            if view is not None and view.shape == tensor.shape and view.dtype == tensor.dtype:
                tensor.data = view.copy_(tensor.data)
            else:
                tensor.data = tensor.data.to("cpu")

    def _pre(self, module: nn.Module, args: Any) -> None:
        if module is self.model:
            self.refresh()
            if self.prefetcher is not None:
                self.prefetcher.begin_forward()
        elif id(module) in self.moving:
            if torch.is_grad_enabled() and not self.recomputed_backward:
                module.to(self.device)
                self.visits[self.phase, "waited"] += 1
                return
            # inference: keep the CPU tensors and only point the parameters at device copies for this call
            tensors = module_tensors(module)
            self.stash[id(module)] = [(t, t.data) for t in tensors]
            if self.prefetcher is None:
                copies, ahead = [t.data.to(self.device, non_blocking=True) for t in tensors], False
            else:
                copies, ahead = self.prefetcher.take(module)
                self.prefetcher.prefetch_after(module, self.moving.get)
            for tensor, copy in zip(tensors, copies):
                tensor.data = copy
            self.visits[self.phase, "ahead" if ahead else "waited"] += 1

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in self.moving:
            stashed = self.stash.pop(id(module), None)
            if stashed is None:
                self._to_host(self._name_of(module))
                return
            for tensor, data in stashed:
                tensor.data = data

    def _outside_blocks(self) -> Iterator[nn.Module]:
        prefixes = tuple(f"{name}." for name in self.blocks)
        for name, module in self.model.named_modules():
            if name not in self.blocks and not name.startswith(prefixes):
                yield module

    def _name_of(self, module: nn.Module) -> str:
        return next(n for n in self.blocks if self.model.get_submodule(n) is module)

    def __enter__(self) -> Offload:
        self.model.to("cpu")
        if self.max_gpu_memory is not None:
            self._check_budget()
        try:
            for name in self.blocks:
                self._house(name)
        except BaseException:
            self._release_homes()
            raise
        for module in self._outside_blocks():
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(self.device)
            for key, buffer in module.named_buffers(recurse=False):
                module._buffers[key] = buffer.to(self.device)
        self.refresh()
        if self.prefetch:
            self.prefetcher = Prefetcher(self.device, self.max_gpu_memory)
        self.handles = [
            module_hooks.register_module_forward_pre_hook(self._pre),
            module_hooks.register_module_forward_hook(self._post, always_call=True),  # also when forward raises
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        self.model.to("cpu")
        self._release_homes()

    def _check_budget(self) -> None:
        """Refuse a ``max_gpu_memory`` that cannot hold the parts outside the blocks plus the largest block."""
        outside = sum(t.nbytes for m in self._outside_blocks() for t in (*m.parameters(recurse=False),
                                                                          *m.buffers(recurse=False)))
        name, largest = max(((n, module_bytes(self.model.get_submodule(n))) for n in self.blocks),
                            key=lambda item: item[1], default=("", 0))
        allocated = torch.cuda.memory_allocated(self.device)
        need = allocated + outside + largest
        if need > self.max_gpu_memory:
            raise BlockpruneError(
                f"max_gpu_memory={gib(self.max_gpu_memory)} cannot hold what offload keeps on {self.device} at once: "
                f"{gib(outside)} for the parts outside the blocks, {gib(largest)} for the largest block ({name}) and "
                f"{gib(allocated)} already allocated; raise max_gpu_memory above {gib(need)} (activations come on top)"
            )

    def _release_homes(self) -> None:
        for home in self.homes.values():
            home.buffer.release()
        self.homes.clear()

    @contextlib.contextmanager
    def counting(self, phase: str) -> Iterator[None]:
        """Count the block runs inside under ``phase`` in :attr:`visits`."""
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    def visit_counts(self) -> dict[str, int]:
        """:attr:`visits` as ``{"scoring.ahead": n, "scoring.waited": m, ...}``."""
        return {f"{phase}.{kind}": n for (phase, kind), n in sorted(self.visits.items())}

    @contextlib.contextmanager
    def visiting(self, module: nn.Module) -> Iterator[None]:
        """Device copies of ``module``'s tensors in place for the ``with`` body, its own tensors back after: what
        changed in the copies is dropped (tensors already on the device, e.g. trained ones, are used as they are)."""
        stashed = [(t, t.data) for t in module_tensors(module)]
        try:
            for tensor, data in stashed:
                tensor.data = data.to(self.device, non_blocking=True)
            yield
        finally:
            for tensor, data in stashed:
                tensor.data = data

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
                self._to_host(name)
            self.refresh()
