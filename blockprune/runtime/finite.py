"""Finding NaN and Inf in calibration batches before any work, named by the batch's index in the caller's list.

Least squares, sandwich training and its held-out report each use a subset of the batches; a bad value found
there would be named by its place in the subset, blamed on the learning rate, or not noticed at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import NonFiniteActivationError


def tensors_in(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor inside ``value`` (dicts, lists and tuples), paths like ``['a'][0]``."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from tensors_in(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            yield from tensors_in(item, f"{where}[{position}]")


def non_finite(tensor: torch.Tensor, allow_inf: bool = False) -> str | None:
    """``"NaN"`` or ``"Inf"`` if ``tensor`` holds one (Inf passes with ``allow_inf``), else ``None``."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return None
    if torch.isnan(tensor).any():
        return "NaN"
    if not allow_inf and torch.isinf(tensor).any():
        return "Inf"
    return None


def check_finite_batches(batches: list[Mapping[str, Any]], what: str = "calibration batch",
                         fix: str = "fix or drop that batch") -> None:
    """Raise :class:`~blockprune.errors.NonFiniteActivationError` naming the first batch (by its index in
    ``batches``) and value holding NaN or Inf, then ``fix``. Inf is allowed in values whose key names a mask
    (additive attention masks use ``-inf``)."""
    for index, batch in enumerate(batches):
        for key, value in batch.items():
            for path, tensor in tensors_in(value, repr(key)):
                found = non_finite(tensor, allow_inf="mask" in str(key))
                if found is not None:
                    raise NonFiniteActivationError(f"{what} {index} holds {found} in {path}; {fix}")
