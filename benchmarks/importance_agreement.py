"""How well each cheap importance metric agrees with the paper's removal score (FID + CLIP), and what it costs.

    python benchmarks/importance_agreement.py --model flux-small        # a trained small model (issue 5)
    python benchmarks/importance_agreement.py --random --prompts 4      # CPU smoke run, random weights

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

CHEAP = ("output_mse", "block_influence", "fit_residual")


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
    parser.add_argument("--calibration", type=int, default=8, help="calibration batches for the cheap metrics")
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
    paper = blockprune.importance(pipe, importance={"fid": 0.5, "clip": 0.5}, **common)
    paper_seconds = time.perf_counter() - started
    rows = []
    for metric in CHEAP:
        started = time.perf_counter()
        table = blockprune.importance(pipe, importance=metric, **common)
        seconds = time.perf_counter() - started
        rows.append({"metric": metric, "spearman": spearman(table.scores, paper.scores), "seconds": seconds,
                     "cost": seconds / paper_seconds, "order": table.order})
    report = {"model": name, "device": str(pipe.device), "prompts": args.prompts, "seeds": args.seeds,
              "steps": args.steps, "paper_seconds": paper_seconds, "paper_order": paper.order, "metrics": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "importance_agreement.json").write_text(json.dumps(report, indent=2))
    print(f"\n{name} on {pipe.device}: paper score (fid + clip, {args.prompts} prompts × {args.seeds} seeds, "
          f"{args.steps} steps) took {paper_seconds:.1f} s")
    print(f"{'metric':>16} {'spearman vs paper':>18} {'seconds':>8} {'cost vs paper':>14}")
    for row in rows:
        print(f"{row['metric']:>16} {row['spearman']:>18.3f} {row['seconds']:>8.1f} {row['cost']:>14.3f}")


if __name__ == "__main__":
    main()
