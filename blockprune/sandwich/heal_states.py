"""The inputs global healing trains on: by default, those the compressed model meets when it samples.

Trained on the calibration batches, healing fits the unpruned model where the compressed one does not go: its
own sampling drifts from the unpruned model's, and the error compounds over the steps. On rectified-flow models
healing therefore trains on the compressed model's own trajectories (as DAgger trains a policy on the states it
visits): from seeded noise, conditioned on a training batch's text and guided as the user samples, each Euler
step's input is one training item, and with guidance the same latents under the empty prompt are another. The
targets are the unpruned model's outputs on those very inputs, computed with the original blocks put back for
the moment. On ``auto``'s 20 % plans this turned healing's gain over sandwich training from 0 (reverted) into
+0.45 dB on ``sd3-small`` and from +0.15 into +0.89 dB on ``flux-small`` (``docs/results.md``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter
from ..config import SandwichConfig
from ..errors import BlockpruneError
from ..runtime import distributed
from ..runtime.forward import forward_batch, model_device, output_tensor
from ..scoring.guidance import Guidance
from ..scoring.trajectory import LATENTS, TIMESTEP, flow_trajectory


def resolve_heal_states(option: str, adapter: Adapter, offloaded: bool) -> str:
    """``"trajectory"`` or ``"calibration"`` for ``option``: ``"auto"`` is the own trajectory where the model is a
    rectified-flow one and not offloaded (the unpruned blocks are put back on the GPU to give the targets; an explicit
    ``"trajectory"`` with offload is refused with the other options)."""
    flow = adapter.flow_time_scale is not None
    if option == "auto":
        return "trajectory" if flow and not offloaded else "calibration"
    if option == "trajectory" and not flow:
        raise BlockpruneError(f"heal_states='trajectory' samples the compressed model's own trajectory, which needs a "
                              f"rectified-flow model; the {adapter.name!r} adapter's is not one: use "
                              f"heal_states='calibration'")
    return option


# heal_steps="auto": healing's most steps where it trains on the model's own trajectory. On the project's three models at
# 10-30 % (3 seeds) it added +0.36 dB over 100-step sandwich training on average (worst cell -0.03, within the
# evaluation's noise) for about 0.3 H100-hours on FLUX.1-dev; over 1,000-step sandwich training (the default since
# 2026-12-07) -0.10 to +0.35 dB at 20-30 % (+1.1 and +1.5 on two flux-small seeds at 10 %), so healing is off unless
# asked for (docs/results.md)
AUTO_HEAL_STEPS = 100


def resolve_heal_steps(options: SandwichConfig, adapter: Adapter, offloaded: bool) -> SandwichConfig:
    """``options`` with ``heal_steps="auto"`` settled: :data:`AUTO_HEAL_STEPS` where healing would train on the
    model's own trajectory (:func:`resolve_heal_states`), else 0 (on the calibration it gained less: docs/results.md)."""
    if options.heal_steps != "auto":
        return options
    own = resolve_heal_states(options.heal_states, adapter, offloaded) == "trajectory"
    return replace(options, heal_steps=AUTO_HEAL_STEPS if own else 0)


def own_trajectory_states(model: nn.Module, adapter: Adapter, batches: list[dict[str, Any]], steps: int, count: int,
                          guidance: Guidance | None, seed: int) -> list[dict[str, Any]]:
    """``count`` inputs (on the CPU) the model meets sampling ``steps`` Euler steps from seeded noise, conditioned on
    ``batches`` in turn (fresh noise each round); with ``guidance`` each step gives the empty prompt's input too."""
    if not batches:
        raise BlockpruneError("healing on the model's own trajectory needs training batches; none are left after the "
                              "held-out share: pass more calibration batches")
    per_run = steps * (2 if guidance is not None else 1)
    items: list[dict[str, Any]] = []
    for run in range(math.ceil(count / per_run)):
        index = run % len(batches)
        batch = batches[index]
        empty = guidance.unconditional(batch, index) if guidance is not None else None

        def keep(noisy: dict[str, torch.Tensor], batch: dict[str, Any] = batch, empty: Any = empty) -> None:
            states = {LATENTS: noisy[LATENTS].detach().cpu(), TIMESTEP: noisy[TIMESTEP].detach().cpu()}
            items.append({**batch, **states})
            if empty is not None:
                items.append({**empty, **states})

        with torch.no_grad():
            flow_trajectory(model, batch, index, float(adapter.flow_time_scale), steps, guidance, seed + run, keep)
    return items[:count]


def unpruned_outputs(model: nn.Module, originals: dict[str, nn.Module], items: list[dict[str, Any]]) -> list:
    """The unpruned model's output on each item this rank trains on (CPU; ``None`` for other ranks' items)."""
    world, rank = distributed.world_size(), distributed.rank() if distributed.active() else 0
    with unpruned(model, originals), torch.no_grad():
        return [output_tensor(forward_batch(model, item, index)).detach().cpu() if index % world == rank else None
                for index, item in enumerate(items)]


@contextlib.contextmanager
def unpruned(model: nn.Module, originals: dict[str, nn.Module]) -> Iterator[None]:
    """``model`` with copies of the ``originals`` (the unpruned blocks every stage changed) in place of its own."""
    current = {name: model.get_submodule(name) for name in originals}
    try:
        for name, original in originals.items():
            model.set_submodule(name, copy.deepcopy(original).to(model_device(current[name])))
        yield
    finally:
        for name, module in current.items():
            model.set_submodule(name, module)


def trajectory_training_data(model: nn.Module, adapter: Adapter, batches: list[dict[str, Any]],
                             originals: dict[str, nn.Module], steps: int, count: int, guidance: Guidance | None,
                             seed: int) -> tuple[list[dict[str, Any]], list]:
    """Healing's items and targets on the model's own trajectories (:func:`own_trajectory_states`,
    :func:`unpruned_outputs`)."""
    items = own_trajectory_states(model, adapter, batches, steps, count, guidance, seed)
    return items, unpruned_outputs(model, originals, items)
