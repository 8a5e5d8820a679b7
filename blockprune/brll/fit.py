"""BRLL's least-squares step: the affine map that best replaces a block's residual branch."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import IllConditionedWarning
from .recording import StreamAccumulator

ILL_CONDITIONED = 1e10


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

    A ridge term keeps rank-deficient inputs (few tokens, dead channels) finite; such cases are logged
    as warnings with the condition number.
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
        warnings.warn(
            f"{name or 'stream'}: ill-conditioned least squares ({accumulator.tokens} tokens for {size} unknowns "
            f"per output, condition number {condition:.3g}); the ridge term keeps the answer finite, more "
            f"calibration data makes it better",
            IllConditionedWarning,
            stacklevel=2,
        )
    return AffineFit(
        weight=theta[:-1].T.contiguous(),
        bias=theta[-1].contiguous(),
        relative_error=relative_error,
        condition_number=condition,
        tokens=accumulator.tokens,
        ridge=lam,
    )
