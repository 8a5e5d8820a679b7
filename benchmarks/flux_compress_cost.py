"""What the whole compress(ratio=0.2, sandwich=True) costs on the FLUX.1-dev configuration, with and without offload.

    python benchmarks/flux_compress_cost.py                 # H100: N=8 calibration samples at 1024²
    python benchmarks/flux_compress_cost.py --importance auto --heal-steps 20   # selection and healing included
    python benchmarks/flux_compress_cost.py --tiny          # CPU smoke run on a small FLUX

Both runs (in memory, then offload=True) use the same settings in the same process, healing included (under
offload its backward runs one resident block at a time).

Random bf16 weights, synthetic inputs of the real shapes (4096 image + 512 text tokens). Reports wall time
per phase and peak GPU memory, checks that least-squares memory does not grow with N, and extrapolates to
the paper's 512 + 512 samples (assumptions printed). Writes JSON to $OUT when set.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flux_dev

import blockprune
from blockprune import plugins
from blockprune.brll.recording import record_block
from blockprune.config import SandwichConfig, ScoringConfig
from blockprune.discovery.resolve import resolve_blocks
from blockprune.progressive import split_indices
from blockprune.sandwich.guard import probe_cooldown_steps, probe_steps
from blockprune.sandwich.training import guard_settings
from blockprune.scoring.auto import split_for_selection
from blockprune.scoring.trajectory import trajectory_runs


def build(args, device):
    if args.tiny:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=8,
                                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
        return model

    return flux_dev.build(device, torch.bfloat16)


def inputs(args, count, seed=0):
    """``count`` calibration batches of ``args.batch`` samples each."""
    b = args.batch
    if args.tiny:
        g = torch.Generator().manual_seed(seed)
        return [{"hidden_states": torch.randn(b, 64, 64, generator=g), "encoder_hidden_states": torch.randn(b, 16, 64, generator=g),
                 "pooled_projections": torch.randn(b, 32, generator=g), "timestep": torch.rand(b, generator=g),
                 "guidance": torch.full((b,), 3.5), "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(16, 3)}
                for _ in range(count)]
    return flux_dev.inputs(count, args.resolution, batch=b, seed=seed)


def least_squares_memory(args, device) -> dict[str, float]:
    """Peak memory of recording one single block's normal equations with N and 4N batches."""
    model = build(args, device).to(device)
    batches = inputs(args, 4 * args.ls_batches)
    block = resolve_blocks(model, plugins.get_adapter(model), batches[0])[-1]
    peaks = {}
    for count in (args.ls_batches, 4 * args.ls_batches):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        record_block(model, block, batches[:count])
        peaks[count] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    del model
    return peaks


TARGET_SAMPLES = 1024  # the paper's 512 + 512 calibration samples, in batches of one
SOLVES = {"seconds": 0.0, "count": 0, "in_selection_s": 0.0, "in_selection": 0}


def _synchronized(function, *args, **kwargs):
    """``function(*args, **kwargs)`` and its wall time in seconds, with the GPU's queue drained before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def time_the_solves() -> None:
    """Time each least-squares solve (``fit_affine``) and note how much of it fell inside the selection: a solve
    is of a (d + 1)² system whatever the number of batches, so the extrapolation does not scale it."""
    from blockprune import progressive
    from blockprune.brll import replacement

    fit_affine, auto_select = replacement.fit_affine, progressive.auto_select

    def timed_fit(*args, **kwargs):
        result, seconds = _synchronized(fit_affine, *args, **kwargs)
        SOLVES["seconds"] += seconds
        SOLVES["count"] += 1
        return result

    def noting_select(*args, **kwargs):
        before = dict(SOLVES)
        table = auto_select(*args, **kwargs)
        SOLVES["in_selection_s"] += SOLVES["seconds"] - before["seconds"]
        SOLVES["in_selection"] += SOLVES["count"] - before["count"]
        return table

    replacement.fit_affine, progressive.auto_select = timed_fit, noting_select


CHECKS = {"seconds": 0.0, "batches": 0, "count": 0}


def time_the_checks() -> None:
    """Time the guard's held-out checks inside sandwich training (``evaluate_span`` as ``train_span`` calls it): they
    scale with the held-out samples and the checks, not with the training steps."""
    from blockprune.sandwich import training

    evaluate_span = training.evaluate_span

    def timed_evaluate(modules, span, inputs, targets, device):
        result, seconds = _synchronized(evaluate_span, modules, span, inputs, targets, device)
        CHECKS["seconds"] += seconds
        CHECKS["batches"] += len(inputs)
        CHECKS["count"] += 1
        return result

    training.evaluate_span = timed_evaluate


def compress_once(args, device, offload: bool) -> dict:
    gc.collect()  # the previous run's model holds reference cycles: free its GPU memory before this run
    model = build(args, device)
    model.to("cpu" if offload else device)
    batches = inputs(args, args.samples // args.batch)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    memory = {"max_gpu_memory": args.max_gpu_memory} if offload and args.max_gpu_memory else {}
    SOLVES.update(seconds=0.0, count=0, in_selection_s=0.0, in_selection=0)
    CHECKS.update(seconds=0.0, batches=0, count=0)
    started = time.perf_counter()
    blockprune.compress(model, adapter="flux", ratio=0.2, calibration=batches, device=device, offload=offload,
                        progress=False, cache_dir=False, score_batches=args.score_batches,
                        sandwich_steps=args.steps, sandwich_lr=args.lr, importance=args.importance,
                        heal_steps=args.heal_steps, **auto_options(args),
                        sandwich_gradient_checkpointing=args.gradient_checkpointing, **memory)
    wall = time.perf_counter() - started
    plan = blockprune.plan(model)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    train = sum(s.train_seconds for s in plan.stages)
    result = {"offload": offload, "wall_s": wall, "peak_gib": peak, "phases_s": plan.seconds, "train_s": train,
              "replaced": len(plan.replaced), "blocks": len(plan.blocks), "samples": args.samples, "batch": args.batch,
              "score_batches": args.score_batches, "steps": args.steps, "importance": args.importance,
              "heal_steps": args.heal_steps, "gradient_checkpointing": args.gradient_checkpointing,
              "max_gpu_memory": memory.get("max_gpu_memory"),
              "selection_s": plan.selection.get("seconds", {}), "selection_solves": SOLVES["in_selection"],
              "selection_solves_s": SOLVES["in_selection_s"], "heal": plan.heal, "auto": auto_options(args),
              "evaluations": plan.selection.get("evaluations"), "half_checks": plan.selection.get("half_checks"),
              "finalists": len(plan.selection.get("finalists", {})),
              "offload_visits": plan.offload_visits,
              "span_error_after": [s.relative_error_after for s in plan.stages],
              "stages": [{"steps_run": s.steps_run, "rates_probed": len(s.lr_errors), "best_step": s.best_step}
                         for s in plan.stages],
              "checks_s": CHECKS["seconds"], "check_batches": CHECKS["batches"], "checks": CHECKS["count"]}
    del model
    return result


def auto_options(args) -> dict:
    """The ``auto_*`` options given (the measured run may bound the checks; the extrapolation scales them back)."""
    given = {"auto_refine": args.auto_refine, "auto_finalists": args.auto_finalists,
             "auto_check_samples": args.auto_check_samples}
    return {name: value for name, value in given.items() if value is not None}


def _selection_shares(score_batches: int, batch: int, at_least: int) -> tuple[int, int]:
    """(fit samples, trajectories a check draws) of ``auto`` with ``score_batches`` batches of ``batch`` samples."""
    fit, held = split_for_selection(list(range(score_batches)), ScoringConfig().auto_held_out)
    checked = min(ScoringConfig().auto_check_batches, len(held)) * batch
    return len(fit) * batch, checked * trajectory_runs(checked, at_least)


def extrapolate(row: dict, args) -> dict:
    """Scale each phase to the paper's 512 + 512 calibration samples, split as the library splits them (a fifth held
    out for the guard, the rest fit and train); sandwich training to ``--target-steps`` per stage with the default
    checks and rate probes, its checks by the held-out samples (assumptions in the printout)."""
    options = SandwichConfig()
    ls, _, held = split_indices(args.samples // args.batch, options.split, options.held_out, 0)
    ls_samples, held_samples = len(ls) * args.batch, len(held) * args.batch
    ls, _, held = split_indices(TARGET_SAMPLES, options.split, options.held_out, 0)
    ls_target, held_target = len(ls), len(held)
    phases = row["phases_s"]
    scale = args.target_score_batches / (args.score_batches * args.batch)
    selection = row["selection_s"]
    if selection:  # auto: signals and fits grow with the fit batches, checks with the trajectories they draw
        fit, draws = _selection_shares(args.score_batches, args.batch,
                                       args.auto_check_samples or ScoringConfig().auto_check_samples)
        fit_target, draws_target = _selection_shares(args.target_score_batches, 1, args.target_check_samples)
        rest = phases.get("scoring", 0.0) - sum(selection.values())  # scoring outside auto_select
        solves = row.get("selection_solves_s", 0.0)  # the same (d + 1)² systems at any number of batches
        scoring = ((selection["signals"] + selection["fits"] - solves) * fit_target / fit + solves + rest * scale
                   + selection["checks"] * draws_target / draws)
    else:
        scoring = phases.get("scoring", 0.0) * scale
    least_squares = phases.get("least_squares", 0.0) * ls_target / ls_samples
    recording = phases.get("sandwich", 0.0) - row["train_s"]  # once per stage: held-out spans, targets, evaluations
    measured, target = _guard_work(args.steps, row), _guard_work(args.target_steps, None, len(row["stages"]))
    steps = (row["train_s"] - row["checks_s"]) * target["steps"] / (measured["steps"] * args.batch)
    per_check = row["checks_s"] / max(1, row["check_batches"] * args.batch)  # one held-out sample through a span
    checks = per_check * target["checks"] * held_target
    sandwich = recording * held_target / held_samples + steps + checks
    heal = 0.0
    if row["heal"]:  # training and its checks per step run, the trajectories per step asked; the references once
        trained, states = row["heal"]["seconds"], row["heal"].get("states_seconds", 0.0)
        heal = (phases.get("heal", 0.0) - trained - states
                + trained * args.target_heal_steps / max(1, row["heal"]["steps_run"] * args.batch)
                + states * args.target_heal_steps / max(1, row["heal"]["steps"] * args.batch))
    return {"scoring_h": scoring / 3600, "least_squares_h": least_squares / 3600, "sandwich_h": sandwich / 3600,
            "sandwich_steps_h": steps / 3600, "sandwich_checks_h": checks / 3600, "heal_h": heal / 3600,
            "total_h": (scoring + least_squares + sandwich + heal) / 3600}


def _guard_work(steps: int, row: dict | None, stages: int = 0) -> dict[str, int]:
    """Training steps (every probe and its cool-down included) and held-out checks of all stages: as ``row``'s
    stages ran, or, without a row, ``stages`` stages of ``steps`` steps at the library's defaults that run to the end
    (no early stop)."""
    settings = guard_settings(SandwichConfig(), steps=steps)
    probe, cool = probe_steps(settings), probe_cooldown_steps(settings)
    rates = len(settings.grid) if settings.lr == "auto" else 1
    if row is not None:
        return {"steps": sum(s["steps_run"] + max(0, s["rates_probed"] - 1) * probe + s["rates_probed"] * cool
                             for s in row["stages"]),
                "checks": row["checks"]}
    probe_checks = rates + (1 if cool else 0) if probe else 0  # a score each, and the chosen one's mid-flight error
    checks = 1 + probe_checks + math.ceil((steps - probe) / settings.eval_every)
    return {"steps": stages * (steps + (rates - 1) * probe + rates * cool), "checks": stages * checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="calibration samples (half least squares, half training)")
    parser.add_argument("--batch", type=int, default=1, help="samples per calibration batch (--samples must be a multiple)")
    parser.add_argument("--score-batches", type=int, default=2, help="calibration batches used for scoring")
    parser.add_argument("--steps", type=int, default=20, help="sandwich steps per stage in the measured run")
    parser.add_argument("--lr", default=SandwichConfig().lr, type=lambda v: v if v == "auto" else float(v),
                        help="sandwich_lr (default: the library's)")
    parser.add_argument("--importance", default="output_mse", help="output_mse as in the first measurement, or auto")
    parser.add_argument("--heal-steps", type=int, default=0, help="healing steps (both runs)")
    parser.add_argument("--target-heal-steps", type=int, default=300, help="extrapolation: healing steps of one sample")
    parser.add_argument("--max-gpu-memory", help="offload run: the GPU budget, e.g. 8GiB (default: one block ahead)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="sandwich_gradient_checkpointing=True")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--ls-batches", type=int, default=2)
    parser.add_argument("--target-score-batches", type=int, default=32, help="extrapolation: scoring samples "
                        "(batches of one; with importance='auto' the extrapolation assumes --batch 1)")
    parser.add_argument("--auto-refine", type=int, help="importance auto: auto_refine (default: the library's)")
    parser.add_argument("--auto-finalists", type=int, help="importance auto: auto_finalists (default: the library's)")
    parser.add_argument("--auto-check-samples", type=int, help="importance auto: the measured run's "
                        "auto_check_samples (default: the library's); the checks' time is scaled to --target-check-samples")
    parser.add_argument("--target-check-samples", type=int, default=ScoringConfig().auto_check_samples,
                        help="extrapolation: auto_check_samples (a check's cost is proportional to its draws)")
    parser.add_argument("--target-steps", type=int, default=SandwichConfig().steps,
                        help="extrapolation: sandwich steps of one sample per stage (default: the library's)")
    parser.add_argument("--no-offload", action="store_true", help="skip the offload run")
    parser.add_argument("--no-ls-memory", action="store_true", help="skip the least-squares memory check")
    parser.add_argument("--name", default="flux_compress_cost", help="the JSON file's name in $OUT")
    parser.add_argument("--offload-only", action="store_true", help="only the offload run")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a small FLUX")
    args = parser.parse_args()
    time_the_solves()
    time_the_checks()
    if args.samples % args.batch:
        parser.error(f"--samples {args.samples} is not a multiple of --batch {args.batch}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    rows = []
    memory = least_squares_memory(args, device) if not (args.offload_only or args.no_ls_memory) else {}
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": "bfloat16" if not args.tiny else "float32",
              "resolution": args.resolution, "least_squares_peak_gib": memory, "runs": rows}
    for offload in [False] * (not args.offload_only) + [True] * (not args.no_offload):
        rows.append(compress_once(args, device, offload=offload))
        rows[-1]["extrapolated"] = extrapolate(rows[-1], args)
        if os.environ.get("OUT"):  # after each run, so that a run cut short keeps the ones before
            Path(os.environ["OUT"], f"{args.name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1))
    print(f"\ndevice {report['device']}, torch {report['torch']}, {report['dtype']}, {args.resolution}², "
          f"N={args.samples} samples in batches of {args.batch}, score batches {args.score_batches}, {args.steps} sandwich steps/stage")
    if memory:
        (few, a), (many, b) = memory.items()
        print(f"least-squares peak memory: {a:.2f} GiB with {few} batches, {b:.2f} GiB with {many}")
    print(f"{'offload':>7} {'wall s':>8} {'peak GiB':>9} {'scoring':>8} {'lsq':>7} {'sandwich':>9} {'heal':>7}"
          f" {'extrap. h':>10} {'prefetched':>11}")
    for row in rows:
        p, visits = row["phases_s"], row["offload_visits"]
        ahead = sum(n for k, n in visits.items() if k.endswith(".ahead"))
        share = f"{ahead / max(1, sum(visits.values())):.0%}" if visits else "-"
        print(f"{row['offload']!s:>7} {row['wall_s']:>8.1f} {row['peak_gib']:>9.2f} {p.get('scoring', 0):>8.1f}"
              f" {p.get('least_squares', 0):>7.1f} {p.get('sandwich', 0):>9.1f} {p.get('heal', 0):>7.1f}"
              f" {row['extrapolated']['total_h']:>10.2f} {share:>11}")
    if len(rows) == 2:
        plain, offloaded = rows
        shared = [k for k in ("scoring", "least_squares", "sandwich", "heal") if k in plain["phases_s"]]
        ratios = {k: offloaded["phases_s"].get(k, 0) / plain["phases_s"][k] for k in shared if plain["phases_s"][k]}
        print(f"offload / in memory (same settings): whole {offloaded['wall_s'] / plain['wall_s']:.2f}x; "
              + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items()))
    print(f"extrapolation: 512 + 512 samples (a fifth held out), {args.target_score_batches} scoring "
          f"batches, {args.target_steps} sandwich steps per stage (rate probes, checks as the defaults run them, no "
          f"early stop), {args.target_heal_steps} healing steps")


if __name__ == "__main__":
    main()
