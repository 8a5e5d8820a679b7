"""How well each cheap importance metric agrees with the validated end-to-end error and with the paper's
removal score (FID + CLIP), and what it costs.

    python benchmarks/importance_agreement.py --model flux-small        # a trained small model (issue 5)
    python benchmarks/importance_agreement.py --model flux-deep --no-paper
    python benchmarks/importance_agreement.py --random --prompts 4      # CPU smoke run, random weights

The validated error of a block is what ``importance="auto"`` checks plans on, for a plan of that block alone:
the block replaced by its least-squares fit (on the calibration batches not held out), then the relative error
of the latents after an 8-step trajectory from seeded noise on the held-out batches, against the intact model,
guided as the pipeline samples (``--unguided``: without guidance, as ``auto`` checked before).

The paper's score ablates each block (residual branch skipped), generates images for fixed prompts and seeds
and combines FID and CLIP score (α = β = 0.5). On the toy models, FID is the Fréchet distance on the shapes
checker's features and "CLIP" is the checker's per-image judgement of the prompt (100 if the image shows
its caption entirely, else 0). Each cheap metric is compared with it by Spearman rank correlation across
blocks, and its wall time against the paper score's, both measured in this run. Prints a table last and
writes JSON to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import blockprune
from blockprune import plugins
from blockprune.config import CompressConfig, ScoringConfig
from blockprune.discovery.resolve import resolve_blocks
from blockprune.scoring.auto import TRAJECTORY_STEPS, PlanEvaluator, split_for_selection
from blockprune.scoring.guidance import resolve_guidance
from blockprune.scoring.trajectory import latent_check
from blockprune.toy import (
    CheckerFeatures,
    ToyConfig,
    ToyPipeline,
    calibration_batches,
    detect,
    evaluation_prompts,
    judge,
)
from blockprune.toy.captions import parse_caption
from blockprune.toy.small_models import small_model

CHEAP = {"output_mse": {}, "output_mse/replace": {"ablation": "replace"}, "block_influence": {},
         "fit_residual": {}}  # label -> importance options


def validated_errors(pipe: ToyPipeline, batches: list[dict], guided: bool) -> dict[str, float]:
    """Each block's held-out trajectory error with it alone replaced by its least-squares fit (see the docstring)."""
    model = pipe.transformer
    adapter = plugins.get_adapter(model)
    fit, held = split_for_selection(batches, ScoringConfig().auto_held_out)
    blocks = resolve_blocks(model, adapter, fit[0])
    guidance = resolve_guidance(adapter, pipe, None, None) if guided else None
    check = latent_check(model, held[:ScoringConfig().auto_check_batches], adapter.flow_time_scale, TRAJECTORY_STEPS,
                         guidance)
    with torch.no_grad():
        evaluator = PlanEvaluator(model, blocks, fit, CompressConfig().ridge, None, check)
        return {b.name: evaluator.error([b.name]) for b in blocks}


def checker_scorer(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 for an image that shows its caption entirely, else 0 (the toy stand-in for CLIP score)."""
    judgements = [judge(shapes, parse_caption(p)) for shapes, p in zip(detect(images), prompts)]
    return torch.tensor([100.0 * j.correct for j in judgements])


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman rank correlation of two per-block score tables (average ranks for ties)."""
    names = list(a)

    def ranks(values: list[float]) -> torch.Tensor:
        order = torch.tensor(values, dtype=torch.float64)
        result = torch.empty_like(order)
        for i, v in enumerate(order):
            result[i] = (order < v).sum() + ((order == v).sum() - 1) / 2
        return result

    x, y = ranks([a[n] for n in names]), ranks([b[n] for n in names])
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denominator) if denominator else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-small", help="a small model name from blockprune.toy.small_models")
    parser.add_argument("--random", action="store_true", help="a randomly initialised toy FLUX model (smoke run)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per image")
    parser.add_argument("--calibration", type=int, default=16, help="calibration batches (a quarter held out)")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper's score (its image generation is slow)")
    parser.add_argument("--unguided", action="store_true", help="validate without guidance (as auto checked before)")
    args = parser.parse_args()
    if args.random:
        pipe = ToyPipeline.from_config(ToyConfig(width=32, heads=2, blocks=(2, 4)))
        name = "random toy FLUX (2 + 4 blocks, width 32)"
    else:
        pipe = small_model(args.model).build()
        name = args.model
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    batches = calibration_batches(pipe, args.calibration)
    options = {"generation_prompts": evaluation_prompts(args.prompts), "generation_seeds": list(range(args.seeds)),
               "generation_steps": args.steps, "generation_batch_size": 256, "feature_extractor": CheckerFeatures(), "clip_scorer": checker_scorer}
    common = {"calibration": batches, "progress": False, "cache_dir": False, "metric_options": options}
    started = time.perf_counter()
    validated = validated_errors(pipe, batches, guided=not args.unguided)
    validated_seconds = time.perf_counter() - started
    paper, paper_seconds = None, None
    if not args.no_paper:
        started = time.perf_counter()
        paper = blockprune.importance(pipe, importance={"fid": 0.5, "clip": 0.5}, **common)
        paper_seconds = time.perf_counter() - started
    rows = []
    for label, extra in CHEAP.items():
        started = time.perf_counter()
        table = blockprune.importance(pipe, importance=label.split("/")[0], **extra, **common)
        seconds = time.perf_counter() - started
        rows.append({"metric": label, "spearman_validated": spearman(table.scores, validated),
                     "spearman_paper": spearman(table.scores, paper.scores) if paper else None,
                     "seconds": seconds, "order": table.order})
    if paper:
        rows.append({"metric": "paper (fid + clip)", "spearman_validated": spearman(paper.scores, validated),
                     "spearman_paper": 1.0, "seconds": paper_seconds, "order": paper.order})
    report = {"model": name, "device": str(pipe.device), "calibration": args.calibration, "prompts": args.prompts,
              "seeds": args.seeds, "steps": args.steps, "guided": not args.unguided, "validated": validated, "validated_seconds": validated_seconds,
              "validated_order": sorted(validated, key=validated.get), "metrics": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"importance_agreement_{args.model}{'_unguided' if args.unguided else ''}.json").write_text(json.dumps(report, indent=2))
    print(f"\n{name} on {pipe.device}: validated error of each block took {validated_seconds:.1f} s"
          + ("" if paper is None else f"; the paper score ({args.prompts} prompts × {args.seeds} seeds, "
             f"{args.steps} steps) {paper_seconds:.1f} s"))
    print(f"{'metric':>20} {'spearman vs validated':>22} {'spearman vs paper':>18} {'seconds':>8}")
    for row in rows:
        versus_paper = "-" if row["spearman_paper"] is None else f"{row['spearman_paper']:.3f}"
        print(f"{row['metric']:>20} {row['spearman_validated']:>22.3f} {versus_paper:>18} {row['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
