"""How the healing guard's fresh-noise confirmation sees a heal, sample by sample, against the sampled images.

    python benchmarks/heal_confirmation.py --model flux-small --seed 0 --ratio 0.1 \\
        --blocks-from docs/results/selection-sandwich/selection-flux-small-seed0-r10-30.json --output DIR

The blocks ``auto`` chose (with sandwich training) in a selection.py run are replaced; sandwich training alone, then
with ``heal_steps`` of healing whose best weights are kept whatever the confirmation says (its verdict is recorded).
For the confirmation: each fresh sample's change of log error, the paired t statistic, the Wilcoxon signed-rank
statistic the guard uses, the share of samples that improved, the changes' skew and kurtosis. For the images (the same
prompts and noise as healing.py): each prompt's change of teacher PSNR, its mean and standard error. ``--fresh N``
draws the confirmation's samples for at least N (the library's ``FRESH_TRAJECTORIES`` by default); its trajectories
nest, so the verdict a smaller confirmation (``--sizes``) would have given is the same run's first samples. CPU or GPU,
one run per call; the JSON holds the per-sample changes and the rates healing probed. A table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from healing import chosen_blocks  # noqa: E402
from toy_rows import ADAPTER, Setting  # noqa: E402

import blockprune  # noqa: E402
from blockprune.config import SandwichConfig  # noqa: E402
from blockprune.progressive import split_indices  # noqa: E402
from blockprune.runtime.forward import to_device  # noqa: E402
from blockprune.sandwich import heal_check  # noqa: E402
from blockprune.scoring.trajectory import trajectory_runs  # noqa: E402
from blockprune.toy import calibration_batches, generate, psnr  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's settings: healing.py's, for one ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(ADAPTER), default="flux-small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--blocks-from", type=Path, default=None, help="selection.py JSON with auto's ST rows")
    parser.add_argument("--blocks", nargs="+", default=None, help="the blocks to replace, in order (or --blocks-from)")
    parser.add_argument("--calibration-seed", type=int, default=None,
                        help="draw the calibration from this seed (default: healing.py's, 1000 + --seed)")
    parser.add_argument("--heal-steps", type=int, default=100)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fresh", type=int, default=heal_check.FRESH_TRAJECTORIES,
                        help="the confirmation's samples at least (heal_check.FRESH_TRAJECTORIES for this run)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[BEFORE, 64],
                        help="also give the verdicts of confirmations of at least these samples (at most --fresh; "
                             f"{BEFORE}: the rule before, on the check's batches)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, required=True, help="folder for the JSON")
    return parser.parse_args(argv)


def describe(change: torch.Tensor) -> dict:
    """Mean, standard deviation, paired t, signed-rank z, share fallen, skew and excess kurtosis of the changes."""
    change = change.double()
    mean, std = float(change.mean()), float(change.std())
    centred = change - mean
    t = mean / (std / math.sqrt(change.numel())) if std > 0 else 0.0
    rank = heal_check.signed_rank_z(change, torch.zeros_like(change))
    return {"n": change.numel(), "mean": mean, "std": std, "t": t, "signed_rank_z": rank,
            "fallen": float((change < 0).double().mean()),
            "skew": float((centred ** 3).mean() / std ** 3), "kurtosis": float((centred ** 4).mean() / std ** 4 - 3),
            "changes": change.tolist()}


BEFORE = 32  # the confirmation before FRESH_TRAJECTORIES: at least 32 samples on the check's CHECK_BATCHES batches


def fresh_sizes(args: argparse.Namespace, sizes: list[int]) -> dict[int, int]:
    """For each confirmation size (at least that many samples), how many samples it measures: whole draws of the
    fewest held-out batches that hold that many (heal_check.first_samples; the same split compress makes), or of the
    check's batches for :data:`BEFORE`. These are the first samples of a run with a larger ``--fresh``."""
    defaults = SandwichConfig()
    held = len(split_indices(args.calibration, defaults.split, defaults.held_out, args.seed)[2])
    result = {}
    for at_least in sizes:
        batches = min(held, heal_check.CHECK_BATCHES if at_least == BEFORE else -(-at_least // args.batch_size))
        drawn = batches * args.batch_size
        result[at_least] = drawn * trajectory_runs(drawn, at_least)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    heal_check.FRESH_TRAJECTORIES = args.fresh
    if (args.blocks is None) == (args.blocks_from is None):
        raise SystemExit("give the blocks with --blocks or --blocks-from, one of them")
    setting = Setting.of(args)
    if args.calibration_seed is not None:
        setting.calibration = to_device(calibration_batches(setting.pipe, args.calibration, seed=args.calibration_seed,
                                                            batch_size=args.batch_size), setting.pipe.device)
    common = {"adapter": ADAPTER[args.model], "calibration": setting.calibration, "seed": args.seed,
              "progress": False, "cache_dir": False}
    order = args.blocks or chosen_blocks(setting.pipe, args.ratio, common, args.blocks_from)
    verdicts: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def record(after: torch.Tensor, before: torch.Tensor, z: float = heal_check.CONFIDENCE_Z) -> bool:
        verdicts.append((after.clone(), before.clone(), heal_check.signed_rank_z(after, before) < -z))
        return True  # the best weights are kept, so that the images show what the confirmation judged

    images = {}
    for label, steps in (("ST", 0), ("heal", args.heal_steps)):
        model = copy.deepcopy(setting.pipe)
        heal_check.significantly_lower, original = record, heal_check.significantly_lower
        try:
            blockprune.compress(model, ratio=args.ratio, order=order, heal_steps=steps, **common)
        finally:
            heal_check.significantly_lower = original
        images[label] = generate(model, setting.prompts, setting.seeds, args.steps)
        heal = blockprune.plan(model).heal
    prompt_change = psnr(images["heal"], setting.teacher) - psnr(images["ST"], setting.teacher)
    result = {"model": args.model, "seed": args.seed, "ratio": args.ratio, "heal_steps": args.heal_steps,
              "best_step": heal["best_step"], "steps_run": heal["steps_run"], "lr": heal["lr"],
              "lr_errors": heal["lr_errors"], "error_before": heal["relative_error_before"], "cooled": heal["cooled"],
              "confirmed": verdicts[-1][2] if verdicts else None,
              "fresh": describe(verdicts[-1][0] - verdicts[-1][1]) if verdicts else None,
              "fresh_by_size": ({str(a): describe((verdicts[-1][0] - verdicts[-1][1])[:n])
                                 for a, n in fresh_sizes(args, sorted({*args.sizes, args.fresh})).items()}
                                if verdicts else None),
              "psnr_change": {**describe(prompt_change), "mean_psnr_st": float(psnr(images["ST"], setting.teacher).mean())}}
    args.output.mkdir(parents=True, exist_ok=True)
    name = f"heal-confirmation-{args.model}-seed{args.seed}-r{round(args.ratio * 100)}.json"
    (args.output / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'':<14} {'n':>4} {'mean':>8} {'std':>7} {'t':>7} {'rank z':>7} {'fallen':>7} {'skew':>6} {'kurt':>6}")
    for label, key in (("fresh log err", "fresh"), ("image PSNR", "psnr_change")):
        d = result[key]
        if d is None:
            print(f"{label:<14} healing never beat its start on the check")
            continue
        print(f"{label:<14} {d['n']:>4} {d['mean']:>8.4f} {d['std']:>7.4f} {d['t']:>7.2f} {d['signed_rank_z']:>7.2f} "
              f"{d['fallen']:>7.2f} {d['skew']:>6.2f} {d['kurtosis']:>6.2f}")
    for at_least, d in (result["fresh_by_size"] or {}).items():
        print(f"confirmation of at least {at_least:>4} samples: n {d['n']:>4}, rank z {d['signed_rank_z']:>6.2f}: "
              f"{'kept' if d['signed_rank_z'] < -heal_check.CONFIDENCE_Z else 'refused'}")
    print(f"rates probed {result['lr_errors']}, start {result['error_before']:.4f}, kept {result['lr']}")
    print(f"kept step {result['best_step']}/{result['steps_run']}; the guard would have "
          f"{'kept' if result['confirmed'] else 'refused'} it; image PSNR {result['psnr_change']['mean']:+.2f} dB")
    return result


if __name__ == "__main__":
    main()
