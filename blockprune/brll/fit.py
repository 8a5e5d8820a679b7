"""BRLL's least-squares step: the affine map that best replaces a block's residual branch."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from ..errors import IllConditionedWarning
from .recording import StreamAccumulator

logger = logging.getLogger("blockprune")

ILL_CONDITIONED = 1e10
PLENTY = 2  # tokens per unknown above which a rank deficiency is the inputs' structure, not a lack of data
_warned: set[tuple[str, str]] = set()  # (stream name, cause) already warned about in this process


@dataclass
class AffineFit:
    """``R ≈ X Wᵀ + b`` for one stream, with diagnostics of the solve."""

    weight: torch.Tensor  # (d, d), float64
    bias: torch.Tensor  # (d,), float64
    relative_error: float  # ‖R − Z Θ‖² / ‖R‖² on the recorded tokens
    condition_number: float  # of ZᵀZ before the ridge term (inf when singular)
    tokens: int
    ridge: float  # the absolute λ added to the diagonal


def fit_affine(accumulator: StreamAccumulator, ridge: float = 1e-6, name: str = "") -> AffineFit:
    """Solve ``(ZᵀZ + λI) Θ = ZᵀR`` in float64 with ``λ = ridge · trace(ZᵀZ) / (d + 1)``.

    A ridge term keeps rank-deficient inputs (few tokens, dead channels) finite; such cases get an
    :class:`IllConditionedWarning` with the condition number and the cause, once per stream and cause.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be ≥ 0, got {ridge}")
    if accumulator.tokens == 0:
        raise ValueError(f"no tokens were recorded for {name or 'this stream'}; cannot fit a linear layer")
    ztz, ztr, r_squared = accumulator.normal_equations()
    size = ztz.shape[0]
    lam = ridge * float(torch.diagonal(ztz).sum()) / size
    system = ztz + lam * torch.eye(size, dtype=ztz.dtype, device=ztz.device)
    eigenvalues = torch.linalg.eigvalsh(ztz)
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    condition = largest / smallest if smallest > largest * 1e-15 else float("inf")
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        theta = torch.cholesky_solve(ztr, factor)
    else:
        theta = torch.linalg.lstsq(system.cpu(), ztr.cpu(), driver="gelsd").solution.to(ztr.device)
    residual = r_squared - 2 * float((theta * ztr).sum()) + float((theta * (ztz @ theta)).sum())
    relative_error = max(residual, 0.0) / r_squared if r_squared > 0 else 0.0
    if accumulator.tokens < size or condition > ILL_CONDITIONED:
        rank = int((eigenvalues > largest / ILL_CONDITIONED).sum())
        _warn_ill_conditioned(name or "stream", accumulator.tokens, size, rank, condition)
    return AffineFit(
        weight=theta[:-1].T.contiguous(),
        bias=theta[-1].contiguous(),
        relative_error=relative_error,
        condition_number=condition,
        tokens=accumulator.tokens,
        ridge=lam,
    )


def _warn_ill_conditioned(name: str, tokens: int, size: int, rank: int, condition: float) -> None:
    """One :class:`IllConditionedWarning` per stream and cause in a process; repeats go to the debug log.

    With ``PLENTY`` tokens per unknown, inputs in general position would span every dimension: a deficiency
    is then structural (a stream that is a linear embedding of fewer input channels, such as FLUX's image
    stream at its first block, spans at most that many), and more of the same data does not change it.
    """
    structural = tokens >= PLENTY * size
    cause = "structure" if structural else "data"
    if structural:
        message = (
            f"{name}: ill-conditioned least squares, the inputs span only {rank} of {size} dimensions (the bias "
            f"included) over {tokens} tokens, condition number {condition:.3g}. With this many tokens the "
            f"deficiency is structural: it comes from "
            f"the model (e.g. a stream that is a linear embedding of fewer input channels, as FLUX's image stream "
            f"is at its first block) or from inputs that repeat, so more calibration data of the same kind will not "
            f"change it; the ridge term handles it (directions the inputs never take get no weight)"
        )
    else:
        message = (
            f"{name}: ill-conditioned least squares ({tokens} tokens for {size} unknowns per output, condition "
            f"number {condition:.3g}); the ridge term keeps the answer finite, more calibration data makes it better"
        )
    if (name, cause) in _warned:
        logger.debug("%s", message)
        return
    _warned.add((name, cause))
    warnings.warn(message + " (warned once per stream and cause)", IllConditionedWarning, stacklevel=3)
