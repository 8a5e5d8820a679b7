"""The rate of guarded training: its schedule (linear warm-up, cosine decay) and, for ``lr="auto"``, the rates probed.

With more rates in the grid than probes, the probes walk it: the two middle rates first, then, while probes are left
and the best so far sits at an end of those probed, the grid's next rate beyond it; the walk stops once the best is
bracketed. Sandwich training walks 1e-4 … 3e-3 with three probes: 3e-4 and 1e-3, then 3e-3 if 1e-3 scored better,
else 1e-4.
"""

from __future__ import annotations

import math

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)  # lr="auto": the rates a probe may try, ascending, the paper's 1e-4 lowest
PROBES = 3  # lr="auto": probes per training
WARMUP_SHARE = 0.1  # of the steps, at a linearly rising rate
FINAL_LR_SHARE = 0.1  # the cosine decays to this share of the peak rate


def learning_rate(step: int, steps: int, peak: float) -> float:
    """The rate of optimizer step ``step`` (0-based) of ``steps``: linear warm-up, then cosine decay."""
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_rate(grid: tuple[float, ...], probes: int, scores: dict[float, float]) -> float | None:
    """The next rate ``lr="auto"`` probes given the scores so far (lower is better), ``None`` when done: each rate of
    a grid of at most ``probes``, in turn; of a longer grid the walk of the module docstring."""
    if len(scores) >= probes:
        return None
    if len(grid) <= probes:
        return next((rate for rate in grid if rate not in scores), None)
    if len(scores) < 2:  # the two middle rates
        return grid[(len(grid) - 1) // 2 + len(scores)]
    best = min(scores, key=scores.__getitem__)
    at = grid.index(best)
    step = -1 if best == min(scores) else 1 if best == max(scores) else 0  # towards the better end; 0: bracketed
    return grid[at + step] if step and 0 <= at + step < len(grid) else None
