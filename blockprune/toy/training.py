"""Rectified-flow training of a toy pipeline (transformer and text encoder jointly) within a time budget.

Batches are generated on the training device. The learning rate warms up, then follows a cosine
to ``final_lr_fraction`` of its peak over the run's progress, which is the larger of the share of the
time budget and of ``max_steps`` used, so a run ends its schedule whatever the device's speed.
An exponential moving average (EMA) of the weights is kept alongside.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import BlockpruneError
from .dataset import sample_batch
from .models import velocity
from .pipeline import ToyPipeline


@dataclass
class TrainingSettings:
    """How to train: budget (minutes and/or steps), batch, optimiser, EMA, caption dropout, seed, logging."""

    minutes: float = 5.0
    max_steps: int | None = None
    batch_size: int = 1024
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    final_lr_fraction: float = 0.02
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    drop_caption: float = 0.1  # share of captions replaced by the empty prompt (for classifier-free guidance)
    seed: int = 0
    log_every: int = 200


@dataclass
class TrainingResult:
    """What a run did: steps, seconds, logged (step, mean loss) pairs and the EMA weights per model."""

    steps: int
    seconds: float
    losses: list[tuple[int, float]]
    ema: dict[str, dict[str, torch.Tensor]] = field(repr=False)

    @property
    def final_loss(self) -> float:
        """The last logged mean loss."""
        return self.losses[-1][1]


def flow_matching_loss(pipe: ToyPipeline, batch_images: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator, drop_caption: float) -> torch.Tensor:
    """Mean squared error of the predicted velocity ``noise − x₀`` at logit-normal times, captions dropped at random."""
    x0 = batch_images * 2 - 1
    n = len(x0)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.sigmoid(torch.randn(n, generator=generator, device=x0.device))
    dropped = torch.rand(n, generator=generator, device=x0.device) < drop_caption
    tokens = torch.where(dropped[:, None], pipe.text_encoder.empty_tokens(n), tokens)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    states, pooled = pipe.text_encoder(tokens)
    prediction = velocity(pipe.transformer, pipe.config, x_t, t, states, pooled)
    return torch.nn.functional.mse_loss(prediction.float(), noise - x0)


def _learning_rate(settings: TrainingSettings, step: int, progress: float) -> float:
    warmup = min(1.0, (step + 1) / max(settings.warmup_steps, 1))
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return settings.learning_rate * warmup * (settings.final_lr_fraction + (1 - settings.final_lr_fraction) * cosine)


def train(pipe: ToyPipeline, settings: TrainingSettings, log: Callable[[str], None] = print) -> TrainingResult:
    """Train ``pipe`` in place on its device (bf16 autocast on CUDA) until the minutes or steps run out."""
    if settings.max_steps is None and not settings.minutes > 0:
        raise BlockpruneError("give a training budget: minutes > 0 or max_steps")
    device = pipe.device
    pipe.transformer.train()
    pipe.text_encoder.train()
    parameters = [p for module in (pipe.transformer, pipe.text_encoder) for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=settings.weight_decay, fused=device.type == "cuda")
    ema = [p.detach().clone().float() for p in parameters]
    generator = torch.Generator(device).manual_seed(settings.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    budget = settings.minutes * 60 if settings.minutes > 0 else math.inf
    losses: list[tuple[int, float]] = []
    running, counted, step = torch.zeros((), device=device), 0, 0
    started = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - started
        progress = max(elapsed / budget, step / settings.max_steps if settings.max_steps else 0.0)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, step, progress)
        batch = sample_batch(settings.batch_size, "train", generator=generator)
        with autocast:
            loss = flow_matching_loss(pipe, batch.images, batch.tokens, generator, settings.drop_caption)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        optimizer.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach().float() for p in parameters], 1 - decay)
        running += loss.detach()
        counted += 1
        step += 1
        if step % settings.log_every == 0:
            losses.append((step, float(running) / counted))
            if not math.isfinite(losses[-1][1]):
                raise BlockpruneError(
                    f"training diverged by step {step} (mean loss {losses[-1][1]}); lower the learning rate "
                    f"(peak {settings.learning_rate:g})"
                )
            running.zero_()
            counted = 0
            rate = step * settings.batch_size / (time.perf_counter() - started)
            log(f"step {step:6d}  loss {losses[-1][1]:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  {rate:,.0f} samples/s")
    if counted:
        losses.append((step, float(running) / counted))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    names = {id(p): (part, name) for part in ("transformer", "text_encoder") for name, p in getattr(pipe, part).named_parameters()}
    ema_states: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "text_encoder": {}}
    for parameter, average in zip(parameters, ema):
        part, name = names[id(parameter)]
        ema_states[part][name] = average
    return TrainingResult(step, seconds, losses, ema_states)


def load_ema(pipe: ToyPipeline, result: TrainingResult) -> None:
    """Copy the EMA weights of ``result`` into ``pipe`` (buffers and other state stay as they are)."""
    with torch.no_grad():
        for part, state in result.ema.items():
            parameters = dict(getattr(pipe, part).named_parameters())
            for name, value in state.items():
                parameters[name].copy_(value)
