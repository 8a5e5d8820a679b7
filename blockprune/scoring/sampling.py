"""How many denoising steps the user will sample with, for the checks that should step as the sampler does.

Errors of replaced blocks compound, or cancel, over the sampler's steps, so a plan that wins over a short
trajectory can lose over the real one: on ``flux-deep`` at 10 %, an 8-step check ranked three plans against
the order of their 20-step images, and a 20-step check ranked all three right (``docs/results.md``). The count
is the ``sampling_steps`` option, else the pipeline's own (its call's default ``num_inference_steps``, else its
config's), else ``DEFAULT_SAMPLING_STEPS``.
"""

from __future__ import annotations

import inspect
from typing import Any

STEPS_ARGUMENT = "num_inference_steps"
DEFAULT_SAMPLING_STEPS = 28  # diffusers' FLUX.1-dev and SD3 pipelines sample with 28 steps by default


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def sampling_steps(pipeline: Any, option: int | None) -> int:
    """The ``sampling_steps`` option, else the steps ``pipeline`` samples with by default, else 28."""
    if option is not None:
        return option
    if pipeline is None:
        return DEFAULT_SAMPLING_STEPS
    parameter = inspect.signature(pipeline.__call__).parameters.get(STEPS_ARGUMENT)
    steps = None if parameter is None else _positive_int(parameter.default)
    if steps is None:
        steps = _positive_int(getattr(getattr(pipeline, "config", None), STEPS_ARGUMENT, None))
    return steps if steps is not None else DEFAULT_SAMPLING_STEPS
