"""What a coverage case is: one diffusers transformer family, built tiny, with calibration inputs that fit it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """One transformer family of diffusers, in a configuration small enough for a CPU test.

    ``make`` builds the model from its class's own constructor (random weights, eval mode);
    ``batches(count, seed)`` gives calibration batches of forward keyword arguments. ``lists``
    maps each block list the adapter must find to its length; ``streams`` maps each block class
    to the stream names its blocks have (a set where blocks of one class differ, as SD3's last
    block does). ``failure``, when set, is a pattern of the error that compression must raise,
    because the family is out of reach for the stated reason; ``notes`` go into the compatibility table.
    """

    name: str
    make: Callable[[], nn.Module]
    batches: Callable[[int, int], list[dict]]
    lists: dict[str, int]
    streams: dict[str, tuple[str, ...] | set[tuple[str, ...]]]
    adapter: str = "generic"
    failure: str | None = None
    notes: str = ""

    @property
    def blocks(self) -> int:
        """How many blocks the adapter must find."""
        return sum(self.lists.values())


def seeded(seed: int) -> torch.Generator:
    """A CPU generator, so that every batch is reproducible."""
    return torch.Generator().manual_seed(seed)


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal values of ``shape``."""
    return torch.randn(*shape, generator=generator)


def evaluated(values: dict, generator: torch.Generator) -> dict:
    """``values`` with every callable replaced by its result on ``generator`` (extra inputs drawn per batch)."""
    return {key: value(generator) if callable(value) else value for key, value in values.items()}


def batches_of(make_batch: Callable[[torch.Generator], dict]) -> Callable[[int, int], list[dict]]:
    """A ``batches(count, seed)`` factory that calls ``make_batch`` ``count`` times on one seeded generator."""

    def batches(count: int, seed: int) -> list[dict]:
        generator = seeded(seed)
        return [make_batch(generator) for _ in range(count)]

    return batches


def built(cls: type, seed: int = 0, **config) -> Callable[[], nn.Module]:
    """A factory of ``cls(**config)`` with seeded random weights, in eval mode.

    Parameters that the constructor sets to zero (gates, modulation tables, biases) get small random
    values too, as a trained model's would have, so that no block starts out as an identity.
    """

    def make() -> nn.Module:
        torch.manual_seed(seed)
        model = cls(**config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.is_floating_point() and not parameter.any():
                    parameter.normal_(0.0, 0.02)
        return model

    return make
