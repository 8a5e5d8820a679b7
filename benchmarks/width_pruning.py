"""The width-pruning baseline of the FastFLUX paper ("FLUX-Pruning"): structured L1-norm pruning of every block.

Where blockprune removes whole blocks, this baseline keeps every block and makes each one narrower: in every
double and single FLUX block (and every SD3 joint block) it keeps a fraction of the attention heads and of the MLP hidden channels (those
with the largest L1 norms) and physically shrinks the linear layers, so parameters, FLOPs and latency drop.
The pruned model is then fine-tuned to reproduce the unpruned teacher's output (:func:`finetune`).

    pruned = l1_prune(copy.deepcopy(pipe.transformer), keep_for_flops(pipe.transformer, batch, 0.8 * flops))
    losses = finetune(pruned, pipe.transformer, calibration, steps=200)

Imported by ``benchmarks/ablation.py`` (with ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn
from torch.nn import functional as F

from blockprune.discovery.flops import count_flops
from blockprune.errors import BlockpruneError
from blockprune.runtime.forward import model_device, output_tensor, to_device

__all__ = ["finetune", "keep_for_flops", "l1_prune"]


def _check_keep(keep: float) -> None:
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0.0 < keep <= 1.0:
        raise BlockpruneError(
            f"keep={keep!r} is not a fraction to keep; give a number in (0, 1] (1.0 keeps every channel and head)"
        )


def _linear(module: nn.Module, name: str) -> nn.Linear:
    """``module`` itself when it is a plain ``nn.Linear`` (a LoRA or quantised wrapper cannot be sliced here)."""
    if type(module) is not nn.Linear:
        raise BlockpruneError(
            f"{name} is a {type(module).__name__}, not a plain torch.nn.Linear; width pruning slices plain linear "
            f"layers only: merge or unload adapters (and undo quantisation) first"
        )
    return module


def _keep_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep the output channels ``index`` of ``linear`` (rows of its weight, entries of its bias)."""
    weight = linear.weight
    linear.weight = nn.Parameter(weight.detach()[index].clone(), requires_grad=weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(index)


def _keep_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep the input channels ``index`` of ``linear`` (columns of its weight)."""
    weight = linear.weight
    linear.weight = nn.Parameter(weight.detach()[:, index].clone(), requires_grad=weight.requires_grad)
    linear.in_features = len(index)


def _largest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest ``scores``, in their original order."""
    return torch.topk(scores, count).indices.sort().values


def _row_l1(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.detach().float().abs().sum(dim=1)


def _column_l1(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.detach().float().abs().sum(dim=0)


def _projections(attn: nn.Module) -> list[str]:
    """The q/k/v projections of ``attn``: the image stream's, and the text stream's where it has one."""
    projections = ["to_q", "to_k", "to_v"]
    if attn.added_kv_proj_dim is not None:
        projections += ["add_q_proj", "add_k_proj", "add_v_proj"]
    return projections


def _head_dim(attn: nn.Module) -> int:
    return attn.inner_dim // attn.heads  # FluxAttention has head_dim, diffusers' Attention (SD3) does not


def _head_scores(attn: nn.Module, name: str, out_columns: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per head: the L1 norm of its rows in every q/k/v projection (both streams) plus ``out_columns``, the
    L1 norms of the output projections' input columns that read it (one entry per channel of ``inner_dim``)."""
    channel = sum(_row_l1(_linear(getattr(attn, p), f"{name}.{p}")) for p in _projections(attn))
    channel = channel + sum(out_columns)
    return channel.view(attn.heads, _head_dim(attn)).sum(dim=1)


def _prune_attention(attn: nn.Module, name: str, heads: torch.Tensor) -> torch.Tensor:
    """Keep the attention heads ``heads`` in the q/k/v projections of both streams; returns their channels."""
    if getattr(attn, "fused_projections", False):
        raise BlockpruneError(f"{name} has fused q/k/v projections; call unfuse_qkv_projections() before pruning")
    head_dim = _head_dim(attn)
    channels = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()
    for p in _projections(attn):
        _keep_rows(_linear(getattr(attn, p), f"{name}.{p}"), channels)
    attn.heads = len(heads)
    attn.inner_dim = len(heads) * head_dim
    if hasattr(attn, "head_dim"):
        attn.head_dim = head_dim
    return channels


def _prune_two_stream(block: FluxTransformerBlock | JointTransformerBlock, name: str, keep: float) -> None:
    """A FLUX double block or an SD3 joint block; SD3's last block has no text-stream output or MLP."""
    if getattr(block, "attn2", None) is not None:
        raise BlockpruneError(f"{name} has a second attention (SD3.5 dual attention); l1_prune does not prune it")
    attn = block.attn
    outputs = [_linear(attn.to_out[0], f"{name}.attn.to_out.0")]
    if attn.to_add_out is not None:
        outputs.append(_linear(attn.to_add_out, f"{name}.attn.to_add_out"))
    scores = _head_scores(attn, f"{name}.attn", [_column_l1(out) for out in outputs])
    channels = _prune_attention(attn, f"{name}.attn", _largest(scores, max(1, round(keep * attn.heads))))
    for out in outputs:
        _keep_columns(out, channels)
    for ff_name in ("ff", "ff_context"):
        ff = getattr(block, ff_name)
        if ff is None:
            continue
        up = _linear(ff.net[0].proj, f"{name}.{ff_name}.net.0.proj")
        down = _linear(ff.net[2], f"{name}.{ff_name}.net.2")
        hidden = _largest(_row_l1(up) * _column_l1(down), max(1, round(keep * up.out_features)))
        _keep_rows(up, hidden)
        _keep_columns(down, hidden)


def _prune_single(block: FluxSingleTransformerBlock, name: str, keep: float) -> None:
    attn = block.attn
    proj_mlp = _linear(block.proj_mlp, f"{name}.proj_mlp")
    proj_out = _linear(block.proj_out, f"{name}.proj_out")
    inner, hidden_size = attn.inner_dim, block.mlp_hidden_dim
    if proj_out.in_features != inner + hidden_size:
        raise BlockpruneError(
            f"{name}.proj_out takes {proj_out.in_features} inputs, not attention {inner} + MLP {hidden_size}"
        )
    out_l1 = _column_l1(proj_out)
    heads = _largest(_head_scores(attn, f"{name}.attn", [out_l1[:inner]]), max(1, round(keep * attn.heads)))
    channels = _prune_attention(attn, f"{name}.attn", heads)
    hidden = _largest(_row_l1(proj_mlp) * out_l1[inner:], max(1, round(keep * hidden_size)))
    _keep_rows(proj_mlp, hidden)
    _keep_columns(proj_out, torch.cat([channels, inner + hidden]))
    block.mlp_hidden_dim = len(hidden)
    proj_out._tp_packed_row_blocks = [len(channels), len(hidden)]


def l1_prune(transformer: nn.Module, keep: float) -> nn.Module:
    """Prune every FLUX or SD3 block of ``transformer`` to ``keep`` of its width, in place, and return it.

    Per block, the ``max(1, round(keep * heads))`` attention heads with the largest L1 norm (summed over the
    head's rows of to_q/to_k/to_v, and add_q/k/v_proj in double and joint blocks, and its input columns of the
    output projections: to_out.0 and to_add_out, or the attention part of proj_out in single blocks) are kept,
    the same heads for the image and text streams. Of the MLP hidden channels (ff and ff_context in double and
    joint blocks, proj_mlp in single blocks) the ``max(1, round(keep * hidden))`` with the largest product of the
    L1 norms of the up-projection row and the down-projection column are kept. Kept channels keep their order,
    so ``keep=1.0`` leaves the outputs unchanged. The residual width, norm_q/norm_k and everything outside
    the blocks stay as they are. Raises :class:`BlockpruneError` for ``keep`` outside (0, 1], a model without
    FLUX or SD3 blocks, SD3.5's dual attention, fused q/k/v projections or linear layers that are not plain
    ``nn.Linear`` (e.g. LoRA).
    """
    _check_keep(keep)
    kinds = (FluxTransformerBlock, FluxSingleTransformerBlock, JointTransformerBlock)
    blocks = [(n, m) for n, m in transformer.named_modules() if isinstance(m, kinds)]
    if not blocks:
        raise BlockpruneError(
            f"{type(transformer).__name__} has no FLUX or SD3 blocks (FluxTransformerBlock, "
            f"FluxSingleTransformerBlock, JointTransformerBlock); l1_prune handles those architectures only"
        )
    with torch.no_grad():
        for name, block in blocks:
            if isinstance(block, FluxSingleTransformerBlock):
                _prune_single(block, name, float(keep))
            else:
                _prune_two_stream(block, name, float(keep))
    return transformer


def _pruned_flops(transformer: nn.Module, batch: dict[str, Any], keep: float) -> int:
    model = l1_prune(copy.deepcopy(transformer), keep)
    flops = count_flops(model, batch)
    if flops is None:
        raise BlockpruneError(f"torch's FLOP counter cannot run {type(transformer).__name__}; keep_for_flops needs it")
    return flops


def keep_for_flops(transformer: nn.Module, batch: dict[str, Any], target_flops: float) -> float:
    """The keep fraction whose :func:`l1_prune`-d model has forward FLOPs on ``batch`` closest to ``target_flops``.

    Bisection on pruned copies (``transformer`` is not changed), FLOPs from :func:`blockprune.discovery.flops.count_flops`;
    it stops at the resolution of one MLP channel. Returns 1.0 for a target at or above the unpruned FLOPs and
    the smallest useful keep (one channel per MLP, one head) for a target at or below that model's.
    """
    if not math.isfinite(target_flops) or target_flops <= 0:
        raise BlockpruneError(f"target_flops={target_flops!r}; give a positive FLOP count")
    hidden = [b.mlp_hidden_dim for b in transformer.modules() if isinstance(b, FluxSingleTransformerBlock)]
    two_stream = (FluxTransformerBlock, JointTransformerBlock)
    hidden += [b.ff.net[0].proj.out_features for b in transformer.modules() if isinstance(b, two_stream)]
    resolution = 1.0 / (2 * max(hidden, default=1))
    lo, hi = resolution, 1.0
    flops = {hi: _pruned_flops(transformer, batch, hi), lo: _pruned_flops(transformer, batch, lo)}
    if flops[hi] <= target_flops:
        return hi
    if flops[lo] >= target_flops:
        return lo
    while hi - lo > resolution:  # invariant: flops[lo] < target <= flops[hi]
        mid = (lo + hi) / 2
        flops[mid] = _pruned_flops(transformer, batch, mid)
        if flops[mid] < target_flops:
            lo = mid
        else:
            hi = mid
    return lo if target_flops - flops[lo] < flops[hi] - target_flops else hi


def finetune(
    transformer: nn.Module,
    teacher: nn.Module,
    batches: Sequence[dict[str, Any]],
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
) -> list[float]:
    """Fine-tune all of ``transformer`` (AdamW) to reproduce ``teacher``'s output on ``batches``; the loss per step.

    Step ``i`` uses ``batches[i % len(batches)]`` (passed as keyword arguments, moved to each model's
    device); the loss is the MSE, in float32, between the two models' output tensors
    (:func:`blockprune.calibration.output_tensor`). Teacher outputs are computed once per batch and kept.
    Every parameter of ``transformer`` is made trainable; it is left in eval mode, the teacher untouched.
    """
    if steps < 0:
        raise BlockpruneError(f"steps={steps}; give a number of optimizer steps >= 0")
    if not batches:
        raise BlockpruneError("finetune needs at least one calibration batch (a dict of forward keyword arguments)")
    torch.manual_seed(seed)
    device, teacher_device = model_device(transformer), model_device(teacher)
    targets: dict[int, torch.Tensor] = {}
    transformer.requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr)
    losses: list[float] = []
    transformer.train()
    try:
        for step in range(steps):
            index = step % len(batches)
            if index not in targets:
                with torch.no_grad():
                    output = teacher(**to_device(batches[index], teacher_device))
                targets[index] = output_tensor(output).detach().to(device, torch.float32)
            output = output_tensor(transformer(**to_device(batches[index], device)))
            loss = F.mse_loss(output.float(), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        transformer.eval()
    return losses
