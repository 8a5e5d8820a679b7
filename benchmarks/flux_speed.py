"""FLUX.1-dev speed: the full model against blockprune-compressed ones, eager and under torch.compile.

The FLUX.1-dev configuration (METHOD.md §1) with random bf16 weights on one CUDA GPU, 1024² (4096 image and
512 text tokens), batch 1. Speed does not depend on weight values, so nothing is downloaded. Blocks are chosen
by blockprune's built-in importance (``output_mse``) on synthetic calibration batches of the real shapes and
replaced by least squares (``sandwich=False``) at each ratio. Every latency is the median of ``--iterations``
timed forwards after ``--warmup`` untimed ones, with CUDA events, and is set against the full eager model
measured in the same run; ``torch.compile`` is timed for the full model and the 20 % one (regional
compilation by default). Each compressed model is timed eager as ``compress`` leaves it, then fused
(``blockprune.fuse``) and timed again; its compiled figure is of the fused model, the fastest form. The floor
of a model is the sum of its blocks' own times (kept blocks and linear surrogates, each timed alone on the
inputs it receives in the model); what the model spends outside its blocks (embedders, rotary embeddings,
output head) comes on top of it.

    python benchmarks/flux_speed.py                    # under 8 minutes on an H100
    python benchmarks/flux_speed.py --quick            # fewer iterations, no torch.compile
    python benchmarks/flux_speed.py --tiny --quick     # a tiny configuration on the CPU, in seconds

The table comes last; with ``$OUT`` set, every number is also written to ``$OUT/flux_speed.json``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import diffusers
import torch

import blockprune
from blockprune.discovery.flops import count_flops
from blockprune.errors import IllConditionedWarning
from blockprune.report import format_count
from blockprune.runtime.forward import forward_batch, to_device
from blockprune.runtime.hooks import attached
from blockprune.toy.demo import TINY_FLUX_CONFIG
from blockprune.toy.flux_dev import FLUX_DEV_CONFIG, build_flux, flux_inputs

# Before anything is measured: METHOD.md §6 took 157 s to compile the whole model on an H100; regional
# compilation compiles the two block classes once. Building, compressing and timing one variant: about 45 s.
FIRST_COMPILE_ESTIMATE_S = {"full": 180.0, "regional": 60.0}
VARIANT_ESTIMATE_S = 45.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with the defaults of ``--tiny`` and ``--quick`` filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3", help="comma-separated shares of blocks to replace")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 1024; tiny: 128)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens (default 512; tiny: 8)")
    parser.add_argument("--iterations", type=int, default=None, help="timed forwards per measurement (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default 3)")
    parser.add_argument("--calibration-batches", type=int, default=None,
                        help="synthetic batches for importance and the fits (default 2)")
    parser.add_argument("--score-batches", type=int, default=1, help="of which importance scoring uses the first N")
    parser.add_argument("--quick", action="store_true", help="5 iterations, 1 warm-up, 1 calibration batch, no compile")
    parser.add_argument("--tiny", action="store_true", help="a tiny FLUX configuration on the CPU in float32")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-mode", choices=("regional", "full"), default="regional",
                        help="torch.compile only the repeated blocks (diffusers' regional compilation: the two "
                             "block classes compile once), or the whole model (METHOD.md §6: 157 s)")
    parser.add_argument("--compile-ratios", default="0.2", help="compressed variants compiled besides the full model")
    parser.add_argument("--compile-all", action="store_true", help="compile every variant")
    parser.add_argument("--time-budget", type=float, default=480.0,
                        help="seconds; a compile that would end the run past this is skipped and reported")
    parser.add_argument("--device", default=None, help="default: cuda (tiny: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tiny_defaults = {"resolution": 128, "text_tokens": 8, "iterations": 3, "warmup": 1, "calibration_batches": 1}
    full_defaults = {"resolution": 1024, "text_tokens": 512, "iterations": 10, "warmup": 3, "calibration_batches": 2}
    quick = {"iterations": 5, "warmup": 1, "calibration_batches": 1}
    defaults = {**full_defaults, **(quick if args.quick else {}), **(tiny_defaults if args.tiny else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; run with --tiny (CPU) or --device cpu")
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.compile = not (args.no_compile or args.quick)
    args.compile_ratios = args.ratios if args.compile_all else [float(r) for r in args.compile_ratios.split(",") if r]
    return args


class Timer:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3

    def median(self, fn: Callable[[], Any], iterations: int, warmup: int) -> tuple[float, list[float]]:
        """The median of ``iterations`` timed calls after ``warmup`` untimed ones, and all the times."""
        with torch.no_grad():
            for _ in range(warmup):
                fn()
            self.synchronize()
            times = [self(fn) for _ in range(iterations)]
        return statistics.median(times), times


def block_inputs(model: torch.nn.Module, names: list[str], batch: dict[str, Any]) -> dict[str, tuple]:
    """The (args, kwargs) each named block receives during one forward."""
    captured = {}

    def make_hook(name: str):
        def hook(module, args, kwargs):
            captured[name] = (args, kwargs)

        return hook

    with attached(model, {name: make_hook(name) for name in names}, pre=True):
        forward_batch(model, batch, 0)
    return captured


def block_times(model: torch.nn.Module, names: list[str], batch: dict[str, Any], timer: Timer, args) -> dict:
    """Each block's median time alone (a kept block or a surrogate), on the inputs it gets in the model."""
    times = {}
    for name, (block_args, block_kwargs) in block_inputs(model, names, batch).items():
        module = model.get_submodule(name)
        times[name] = timer.median(lambda: module(*block_args, **block_kwargs), args.iterations, args.warmup)[0]
    return times


def compiled_latency(model: torch.nn.Module, batch: dict[str, Any], timer: Timer, args) -> dict[str, Any]:
    """Compile ``model`` (its first call, timed in seconds), then its median latency."""
    if args.compile_mode == "full":
        compiled = torch.compile(model)
    else:
        model.compile_repeated_blocks()
        compiled = model
    started = time.perf_counter()
    with torch.no_grad():
        compiled(**batch)
    timer.synchronize()
    compile_s = time.perf_counter() - started
    median, times = timer.median(lambda: compiled(**batch), args.iterations, args.warmup)
    torch._dynamo.reset()
    return {"compiled_ms": median, "compiled_ms_all": times, "compile_s": compile_s}


class Budget:
    """Whether a compile still fits in the run's time budget, from the compile and variant times seen so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.seconds = args.time_budget
        self.started = time.perf_counter()
        self.compile_s = 0.0 if args.tiny else FIRST_COMPILE_ESTIMATE_S[args.compile_mode]
        self.variant_s = 0.0 if args.tiny else VARIANT_ESTIMATE_S
        self.variants_seen: list[float] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def variant_done(self, seconds: float) -> None:
        """Record how long building, compressing and timing one compressed variant took (compile excluded)."""
        self.variants_seen.append(seconds)
        self.variant_s = statistics.mean(self.variants_seen)

    def allows_compile(self, variants_left: int) -> bool:
        return self.elapsed() + self.compile_s + variants_left * self.variant_s <= self.seconds


def measure(model, name, ratio, batch, names, timer, args) -> dict[str, Any]:
    """Eager latency, and each block's own time with their sum, the floor."""
    eager_ms, eager_all = timer.median(lambda: model(**batch), args.iterations, args.warmup)
    per_block = block_times(model, names, batch, timer, args)
    return {"name": name, "ratio": ratio, "eager_ms": eager_ms, "eager_ms_all": eager_all,
            "floor_ms": sum(per_block.values()), "block_ms": per_block, "compiled_ms": None, "compile_s": None}


def maybe_compile(model, result, batch, timer, args, budget, variants_left) -> None:
    """Add the compiled latency to ``result`` if this variant is to be compiled and the time budget allows."""
    if not args.compile or (result["ratio"] != 0 and result["ratio"] not in args.compile_ratios):
        return
    if not budget.allows_compile(variants_left):
        result["compile_skipped"] = f"time budget of {args.time_budget:.0f} s"
        return
    result.update(compiled_latency(model, batch, timer, args))
    budget.compile_s = result["compile_s"]


def report_variant(result: dict[str, Any], args) -> None:
    """Peak GPU memory into ``result``, and one progress line."""
    if args.device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    compiled = "" if result["compiled_ms"] is None else (
        f", compiled {result['compiled_ms']:.2f} ms (compile {result['compile_s']:.0f} s)")
    skipped = f", compile skipped ({result['compile_skipped']})" if "compile_skipped" in result else ""
    fused = "" if "fused_eager_ms" not in result else (
        f", fused eager {result['fused_eager_ms']:.2f} ms ({len(result['fused_runs'])} stream runs)")
    print(f"{result['name']}: eager {result['eager_ms']:.2f} ms, floor {result['floor_ms']:.2f} ms{compiled}{skipped}"
          f"{fused}", flush=True)


def table(results: list[dict[str, Any]], header: str) -> str:
    """The results as a plain-text table; ratios are against the full eager model of this run."""
    full = results[0]["eager_ms"]
    lines = [header, f"{'model':<8}{'replaced':>9}{'FLOPs':>10}{'eager ms':>10}{'x full':>8}{'floor ms':>10}"
                     f"{'eager/floor':>12}{'fused ms':>10}{'compiled ms':>13}{'x full':>8}"]
    for r in results:
        fused = f"{r['fused_eager_ms']:.2f}" if "fused_eager_ms" in r else "-"
        compiled = "-" if r["compiled_ms"] is None else f"{r['compiled_ms']:.2f}"
        compiled_ratio = "-" if r["compiled_ms"] is None else f"{r['compiled_ms'] / full:.3f}"
        lines.append(
            f"{r['name']:<8}{len(r['replaced']):>9}{format_count(r['flops']):>10}{r['eager_ms']:>10.2f}"
            f"{r['eager_ms'] / full:>8.3f}{r['floor_ms']:>10.2f}{r['eager_ms'] / r['floor_ms']:>12.3f}"
            f"{fused:>10}{compiled:>13}{compiled_ratio:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table last and return (and write to ``$OUT``) every number."""
    args = parse_args(argv)
    timer, budget = Timer(args.device), Budget(args)
    config = TINY_FLUX_CONFIG if args.tiny else FLUX_DEV_CONFIG
    dtype = torch.float32 if args.device.type == "cpu" else torch.bfloat16

    def build() -> torch.nn.Module:
        return build_flux(config, device=args.device, dtype=dtype, seed=args.seed)

    def on_device(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v.to(dtype) if v.is_floating_point() else v for k, v in to_device(b, args.device).items()}
                for b in batches]

    model = build()
    calibration = on_device(
        flux_inputs(model, args.resolution, args.text_tokens, args.calibration_batches, seed=args.seed)
    )
    batch = on_device(flux_inputs(model, args.resolution, args.text_tokens, seed=args.seed + 1000))[0]
    started = time.perf_counter()
    ranking = blockprune.importance(model, "flux", calibration, progress=False, cache_dir=False,
                                    score_batches=args.score_batches, importance="output_mse")  # as in docs/results.md
    importance_s = time.perf_counter() - started
    names = ranking.blocks
    print(f"importance of {len(names)} blocks in {importance_s:.1f} s; least important first: "
          f"{', '.join(ranking.order[:8])}, ...", flush=True)

    result = measure(model, "full", 0.0, batch, names, timer, args)
    result.update(replaced=[], flops=count_flops(model, batch))
    maybe_compile(model, result, batch, timer, args, budget, len(args.ratios))
    report_variant(result, args)
    results = [result]
    del model
    for index, ratio in enumerate(args.ratios):
        gc.collect()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        started = time.perf_counter()
        model = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IllConditionedWarning)  # the first block's image stream is rank-deficient
            blockprune.compress(model, "flux", ratio=ratio, calibration=calibration, order=ranking.order,
                                sandwich=False, progress=False)
        plan = blockprune.plan(model)
        compress_s = time.perf_counter() - started
        result = measure(model, f"{ratio:.0%}", ratio, batch, names, timer, args)
        result.update(replaced=plan.replaced_names, flops=plan.flops_after, compress_s=compress_s,
                      fit_errors={r.name: {s: v.relative_error for s, v in r.streams.items()} for r in plan.replaced})
        blockprune.fuse(model)  # runs of adjacent surrogates become one map per stream; compiled below like this
        result["fused_runs"] = [{"stream": run.stream, "blocks": run.blocks} for run in blockprune.plan(model).fused]
        result["fused_eager_ms"] = timer.median(functools.partial(model, **batch), args.iterations, args.warmup)[0]
        budget.variant_done(time.perf_counter() - started)
        maybe_compile(model, result, batch, timer, args, budget, len(args.ratios) - index - 1)
        report_variant(result, args)
        results.append(result)
        del model, plan

    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    compile_mode = f"{args.compile_mode} (compressed models fused)" if args.compile else "off"
    header = (f"FLUX {'tiny' if args.tiny else '1-dev'} configuration, random {str(dtype).removeprefix('torch.')} "
              f"weights, {device_name}, {args.resolution}² ({(args.resolution // 16) ** 2} image + {args.text_tokens} "
              f"text tokens), batch 1, torch {torch.__version__}; median of {args.iterations} after {args.warmup} "
              f"warm-up; compile: {compile_mode}; total {budget.elapsed():.0f} s")

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "dtype": str(dtype).removeprefix("torch."), "config": "tiny" if args.tiny else "FLUX.1-dev",
        "resolution": args.resolution, "image_tokens": (args.resolution // 16) ** 2, "text_tokens": args.text_tokens,
        "batch_size": 1, "iterations": args.iterations, "warmup": args.warmup,
        "compile_mode": args.compile_mode if args.compile else None, "importance_s": importance_s,
        "importance_order": ranking.order, "importance_scores": ranking.scores, "total_s": budget.elapsed(),
        "variants": results,
    }
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "flux_speed.json")
        with open(path, "w") as file:
            json.dump(report, file, indent=2)
        print(f"wrote {path}")
    print(table(results, header))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
