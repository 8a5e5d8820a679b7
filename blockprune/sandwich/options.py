"""Sandwich-training options, validated once."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Any

from ..errors import BlockpruneError
from .span import WIDTHS

TARGETS = ("local", "global")


@dataclass(frozen=True)
class SandwichOptions:
    """How each sandwich stage trains; passed to ``compress`` as ``sandwich_<field>`` (``lora_*`` as is)."""

    width: int = 3  # 1: linear layers alone; 3: + nearest unreplaced neighbours (paper); 5: two per side
    steps: int = 100  # optimizer steps per stage
    lr: float = 1e-4  # AdamW learning rate
    batch_size: int = 1  # calibration batches per optimizer step (gradients accumulated)
    split: float = 0.5  # share of calibration batches for training; the rest fit the least squares
    held_out: float = 0.25  # share of the training batches held out for the before/after report
    target: str = "local"  # "local": original blocks on the span's input; "global": unpruned model's activation
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None  # module names inside a block; default: the adapter's
    gradient_checkpointing: bool = False
    train_surrogates: bool = True  # train the span's linear layers in full; False: they keep their fit (or Y = X)
    activation_budget: int = 8 * 2**30  # bytes of recorded activations kept in RAM before spilling to disk

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SandwichOptions:
        """Build from ``compress`` options (``sandwich_width`` → ``width``; ``lora_rank`` etc. keep their names)."""
        values = {}
        for field in fields(cls):
            for key in (f"sandwich_{field.name}", field.name):
                if key in options and options[key] is not None:
                    values[field.name] = options[key]
        if "lora_targets" in values:
            values["lora_targets"] = tuple(values["lora_targets"])
        return cls(**values).validated()

    def validated(self) -> SandwichOptions:
        """Check every field; a bad value is an error that names the option."""
        if self.width not in WIDTHS:
            raise BlockpruneError(f"sandwich_width must be 1, 3 or 5, got {self.width!r}")
        for name in ("steps", "batch_size", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise BlockpruneError(f"{_option(name)} must be a positive integer, got {value!r}")
        for name in ("lr", "lora_alpha", "activation_budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise BlockpruneError(f"{_option(name)} must be a positive number, got {value!r}")
        for name in ("split", "held_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
                raise BlockpruneError(f"{_option(name)} must be strictly between 0 and 1, got {value!r}")
        for name in ("gradient_checkpointing", "train_surrogates"):
            if not isinstance(getattr(self, name), bool):
                raise BlockpruneError(f"{_option(name)} must be True or False, got {getattr(self, name)!r}")
        if self.target not in TARGETS:
            raise BlockpruneError(f"sandwich_target must be 'local' or 'global', got {self.target!r}")
        return self


def _option(name: str) -> str:
    return name if name.startswith("lora_") else f"sandwich_{name}"


def option_names() -> list[str]:
    """The ``compress`` option names that configure sandwich training."""
    return [_option(field.name) for field in fields(SandwichOptions)]
