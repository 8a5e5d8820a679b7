"""Latency measured honestly: warm-up calls, repeats, the median and the spread, and whether a ratio is noise.

Used by the demo and the examples. A ratio of two medians is printed with the range that the two spreads allow
(the quartiles); when that range holds 1 the difference is within the run-to-run noise of the machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BlockpruneError


@dataclass(frozen=True)
class Latency:
    """Seconds of each timed call (warm-up calls not included)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        """The median time."""
        return statistics.median(self.times)

    @property
    def quartiles(self) -> tuple[float, float]:
        """The first and third quartiles (both the one time when there is one)."""
        if len(self.times) < 2:
            return self.times[0], self.times[0]
        low, _, high = statistics.quantiles(self.times, n=4, method="inclusive")
        return low, high

    @property
    def spread(self) -> float:
        """Half the interquartile range: the ± printed beside the median."""
        low, high = self.quartiles
        return (high - low) / 2

    def text(self) -> str:
        """``12.30 ms ± 0.40`` (median ± half the interquartile range)."""
        return f"{self.median * 1e3:.2f} ms ± {self.spread * 1e3:.2f}"


def time_calls(
    call: Callable[[], object], repeats: int = 7, warmup: int = 2, synchronize: Callable[[], None] | None = None
) -> Latency:
    """Time ``call`` ``repeats`` times after ``warmup`` untimed calls; ``synchronize`` (e.g.
    ``torch.cuda.synchronize``) runs before and after each timed call."""
    return time_interleaved([call], repeats, warmup, synchronize)[0]


def time_interleaved(
    calls: list[Callable[[], object]], repeats: int = 7, warmup: int = 2, synchronize: Callable[[], None] | None = None
) -> list[Latency]:
    """Time each of ``calls`` ``repeats`` times, taking turns (A B A B ...), so that a machine that slows down or
    speeds up during the measurement affects them alike; ``warmup`` untimed rounds first."""
    if repeats < 1 or warmup < 0:
        raise BlockpruneError(f"latency repeats must be at least 1 and warm-up calls at least 0, got {repeats} and {warmup}")
    sync = synchronize or (lambda: None)
    times: list[list[float]] = [[] for _ in calls]
    for round_ in range(warmup + repeats):
        for index, call in enumerate(calls):
            sync()
            started = time.perf_counter()
            call()
            sync()
            if round_ >= warmup:
                times[index].append(time.perf_counter() - started)
    return [Latency(tuple(series)) for series in times]


def ratio_range(after: Latency, before: Latency) -> tuple[float, float, float]:
    """``after / before`` of the medians, and the lowest and highest ratio the quartiles allow."""
    (low_a, high_a), (low_b, high_b) = after.quartiles, before.quartiles
    return after.median / before.median, low_a / high_b, high_a / low_b


def compare_text(after: Latency, before: Latency) -> str:
    """``× 0.83 (0.79-0.87)``, with ``within noise`` when the range holds 1 (the two cannot be told apart)."""
    ratio, low, high = ratio_range(after, before)
    verdict = "; within noise: the spread of repeated runs is larger than the difference" if low <= 1 <= high else ""
    return f"× {ratio:.3f} ({low:.3f}-{high:.3f}{verdict})"


def machine(device: str = "cpu") -> str:
    """What the timings ran on: the CPU's model name and torch's thread count, or the CUDA device's name."""
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    name = next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")), name)
    return f"{name or 'an unknown CPU'}, {torch.get_num_threads()} threads"
