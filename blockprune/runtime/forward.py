"""Calling a model on one calibration batch: device moves, early stops, the output tensor."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from diffusers.utils import BaseOutput
from torch import nn

from ..errors import BlockpruneError


class StopForward(Exception):
    """Raised by a recording hook once it has what it needs, to skip the rest of the forward."""


def check_batch_keys(model: nn.Module, batch: Mapping[str, Any], index: int) -> None:
    """Name any key the model's forward does not accept, and any required argument missing."""
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not takes_any:
        unknown = sorted(set(batch) - set(parameters))
        if unknown:
            raise BlockpruneError(
                f"calibration batch {index} has key {unknown[0]!r}, which {type(model).__name__}.forward does not "
                f"accept; accepted keys: {', '.join(parameters)}"
            )
    missing = [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name not in batch
    ]
    if missing:
        raise BlockpruneError(
            f"calibration batch {index} lacks {missing[0]!r}, which {type(model).__name__}.forward requires"
        )


def to_device(value: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """``value`` with every tensor detached and moved to ``device``, inside dicts, lists, tuples and dataclass
    instances (rebuilt with :func:`dataclasses.replace` from their init fields); a tensor found in several places
    is moved once, and stays shared (``memo`` maps the ids of tensors already moved to their copies)."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.detach().to(device)
        return memo[id(value)]
    if isinstance(value, Mapping):
        return {k: to_device(v, device, memo) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, memo) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_device(getattr(value, f.name), device, memo) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    return value


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off) inside; then every module's train/eval flag as it was, also on error.

    Modules added inside (surrogates) take the model's own mode.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        model.train(modes[model])
        for module in model.modules():
            if module in modes:
                module.training = modes[module]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def forward_batch(model: nn.Module, batch: Mapping[str, Any], index: int) -> Any:
    """Run the model on one calibration batch, stopping quietly where a hook raises :class:`StopForward`.

    Returns the model's output, or ``None`` when a hook stopped the forward early.
    """
    check_batch_keys(model, batch, index)
    batch = to_device(batch, model_device(model))
    try:
        with torch.no_grad():
            return model(**batch)
    except StopForward:
        return None
    except BlockpruneError:
        raise
    except Exception as error:
        raise BlockpruneError(
            f"{type(model).__name__}.forward rejected calibration batch {index} "
            f"(keys: {', '.join(batch)}): {type(error).__name__}: {error}"
            f"{'' if isinstance(error, torch.OutOfMemoryError) else dtype_hint(model, batch)}"
        ) from error


def dtype_hint(model: nn.Module, batch: Mapping[str, Any]) -> str:
    """A hint for the error message when the batch's floating tensors differ in dtype from the model's weights."""
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    given = sorted({str(v.dtype) for v in batch.values() if isinstance(v, torch.Tensor) and v.is_floating_point()})
    if weights is None or not given or given == [str(weights)]:
        return ""
    return (f". The batch's floating tensors are {', '.join(given)} and the model's weights {weights}: "
            f"blockprune does not cast calibration batches, so cast them to {weights}")


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model's output: ``.sample`` (else the first field) of a diffusers output, or the first item.

    A list of per-sample tensors (Z-Image returns one per image) is flattened into one tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, BaseOutput):
        sample = output.sample if "sample" in output else output.to_tuple()[0]
        if isinstance(sample, list) and sample and all(isinstance(item, torch.Tensor) for item in sample):
            return torch.cat([item.flatten() for item in sample])
        return sample
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BlockpruneError(f"cannot find the output tensor in a {type(output).__name__} returned by the model")
