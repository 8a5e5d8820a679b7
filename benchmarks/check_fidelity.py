"""Does ``auto``'s check rank plans as their images do? Each plan's held-out check error, measured several ways,
against the teacher PSNR its compressed model reached in ``benchmarks/selection.py``.

    python benchmarks/check_fidelity.py --model flux-deep --seed 0 --ratio 0.1 \
        --rows docs/results/selection-cpu/ratios/selection-flux-deep-seed0.json

The plans are the ``blocks`` of the selection rows given (model, seed and ratio matching, least squares only);
``end2start`` and ``start2end`` are added when missing. The calibration and its held-out share are
``selection.py``'s and ``auto``'s. The check's variants:

- ``intact``: every block's surrogate fitted once on the intact model, as ``auto`` checks candidates;
- ``intact/…/per-sample``: the same tensors, each sample's relative error averaged in log (as PSNR in dB is);
- ``progressive``: the plan compressed as ``compress`` does it (each block fitted in the plan's order on the
  model as it is after the earlier replacements), on the fit share only;

each on the latents of a guided trajectory of ``--check-steps`` steps (``auto``: 8). For each variant the table
gives the Spearman correlation of −error with PSNR across plans and the regret: the PSNR the best plan by images
has over the plan the variant would choose. JSON goes to ``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from importance_agreement import spearman
from selection import ADAPTER

import blockprune
from blockprune import plugins
from blockprune.config import CompressConfig, ScoringConfig
from blockprune.discovery.resolve import resolve_blocks
from blockprune.runtime.forward import to_device
from blockprune.scoring.auto import split_for_selection
from blockprune.scoring.guidance import resolve_guidance
from blockprune.scoring.plan_check import PlanEvaluator
from blockprune.scoring.trajectory import latent_check, per_sample_error, relative_error
from blockprune.toy import ToyPipeline, calibration_batches


def plans_from_rows(files: list[Path], model: str, seed: int, ratio: float) -> dict[str, tuple[list[str], float]]:
    """label -> (blocks, PSNR) of the matching least-squares rows of selection JSON files."""
    plans = {}
    for file in files:
        report = json.loads(file.read_text())
        for row in report["rows"]:
            if report["model"] == model and report["seed"] == seed and abs(row["ratio"] - ratio) < 1e-9 \
                    and not row["sandwich"]:
                plans[row["label"]] = (row["blocks"], row["psnr"])
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(ADAPTER), default="flux-deep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--rows", type=Path, nargs="+", required=True, help="selection.py JSON files")
    parser.add_argument("--labels", nargs="*", default=None, help="only these plans (default: every row's)")
    parser.add_argument("--check-steps", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--progressive", action="store_true", help="also check each plan compressed as compress does")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    pipe = ToyPipeline.from_pretrained(args.model).to(args.device)
    model = pipe.transformer
    adapter = plugins.get_adapter(model)
    batches = to_device(calibration_batches(pipe, args.calibration, seed=1000 + args.seed,
                                            batch_size=args.batch_size), pipe.device)
    fit, held = split_for_selection(batches, ScoringConfig().auto_held_out)
    held = held[:ScoringConfig().auto_check_batches]
    blocks = resolve_blocks(model, adapter, fit[0])
    names = [b.name for b in blocks]
    count = round(args.ratio * len(blocks))
    plans = {label: (b, p) for label, (b, p) in plans_from_rows(args.rows, args.model, args.seed, args.ratio).items()
             if args.labels is None or label in args.labels}
    for label, order in (("end2start", names[::-1]), ("start2end", names)):
        if label not in plans and (args.labels is None or label in args.labels):
            plans[label] = (order[:count], None)
    guidance = resolve_guidance(adapter, pipe, None, None)
    checks = {steps: (lambda m, s=steps: latent_check(m, held, adapter.flow_time_scale, s, guidance))
              for steps in args.check_steps}
    errors: dict[str, dict[str, float]] = {label: {} for label in plans}
    seconds: dict[str, float] = {}
    with torch.no_grad():
        evaluators = {}
        for steps, check in checks.items():
            started = time.perf_counter()
            shared = evaluators[args.check_steps[0]].surrogates if evaluators else None  # the same fits, checked longer
            evaluators[steps] = evaluator = PlanEvaluator(model, blocks, fit, CompressConfig().ridge, None, check(model),
                                                          shared)
            for label, (plan, _) in plans.items():
                with evaluator._replaced(plan):
                    measured = evaluator.measure()
                errors[label][f"intact/{steps}"] = relative_error(measured, evaluator.reference)
                errors[label][f"intact/{steps}/per-sample"] = per_sample_error(measured, evaluator.reference)
            seconds[f"intact/{steps}"] = time.perf_counter() - started
    for label, (plan, _) in plans.items() if args.progressive else ():
        started = time.perf_counter()
        compressed = copy.deepcopy(model)
        blockprune.compress(compressed, adapter=ADAPTER[args.model], ratio=len(plan) / len(blocks) - 1e-9,
                            calibration=fit, order=plan, sandwich=False, progress=False, cache_dir=False)
        with torch.no_grad():
            for steps, check in checks.items():
                errors[label][f"progressive/{steps}"] = relative_error(check(compressed)(), evaluators[steps].reference)
        seconds[label] = time.perf_counter() - started
        del compressed
    for label in plans:
        print(f"{label:<22} psnr {plans[label][1] or float('nan'):6.2f} "
              + " ".join(f"{k} {v:.5f}" for k, v in errors[label].items()), flush=True)

    scored = {label: psnr for label, (_, psnr) in plans.items() if psnr is not None}
    best = max(scored.values())
    summary = {}
    for variant in next(iter(errors.values())):
        by_variant = {label: errors[label][variant] for label in scored}
        chosen = min(by_variant, key=by_variant.get)
        summary[variant] = {"spearman": spearman({k: -v for k, v in by_variant.items()}, scored), "chosen": chosen,
                            "regret_db": best - scored[chosen]}
    report = {"model": args.model, "seed": args.seed, "ratio": args.ratio, "device": str(pipe.device),
              "plans": {label: {"blocks": b, "psnr": p, "errors": errors[label]} for label, (b, p) in plans.items()},
              "summary": summary, "seconds": seconds}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"check_fidelity_{args.model}_seed{args.seed}_r{args.ratio}.json").write_text(
            json.dumps(report, indent=1) + "\n")
    print(f"\n{args.model} seed {args.seed} at {args.ratio:.0%}: {len(scored)} plans with a PSNR, best {best:.2f} dB")
    print(f"{'check':<16} {'spearman':>8} {'chosen':<22} {'regret dB':>9}")
    for variant, row in summary.items():
        print(f"{variant:<16} {row['spearman']:8.3f} {row['chosen']:<22} {row['regret_db']:9.2f}")


if __name__ == "__main__":
    main()
