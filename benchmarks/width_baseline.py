"""Width pruning + fine-tuning against BRLL + sandwich training at matched FLOPs, on the project's trained models.

    python benchmarks/width_baseline.py --model sd3-small --seed 0 \\
        --match docs/results/selection-sandwich/selection-sd3-small-seed0.json
    python benchmarks/width_baseline.py --quick --match S.json --output /tmp/w   # CPU smoke run (tiny counts)

``--match`` is a JSON written by ``benchmarks/selection.py`` with sandwich rows. At each ratio asked for (20 %
by default), the blocks of its ``auto`` row with sandwich training are replaced again by least squares in a
copy, only to count that model's FLOPs. The width-pruned model (``benchmarks/width_pruning.py``) keeps the share of attention heads
and MLP channels whose FLOPs match it, and then every weight is fine-tuned to the unpruned model's output on
the same calibration batches, once per learning rate. Calibration, prompts, noise and sampling are
selection.py's, so these rows compare with the JSON's. The table puts the JSON's BRLL + ST row beside them.
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

from toy_rows import ADAPTER, Setting, write_rows
from width_pruning import finetune, keep_for_flops, l1_prune

import blockprune
from blockprune.discovery.flops import count_flops
from blockprune.errors import BlockpruneError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--match", type=Path, required=True, help="selection.py JSON with sandwich rows")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2], help="ratios of --match to match (0.2)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3], help="one row per learning rate")
    parser.add_argument("--finetune-steps", type=int, default=400, help="AdamW steps on every weight (default 400)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "docs/results/width-baseline")))
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny counts")
    args = parser.parse_args(argv)
    matched = json.loads(args.match.read_text(encoding="utf-8"))
    args.brll = [r for r in matched["rows"] if r["label"] == "auto" and r["sandwich"] and r["ratio"] in args.ratios]
    if not args.brll:
        raise BlockpruneError(f"{args.match} has no auto row with sandwich training at ratios {args.ratios}; "
                              f"run selection.py --sandwich --labels auto --ratios ... first")
    for key in ("model", "seed", "calibration", "batch_size", "prompts", "steps"):
        setattr(args, key, matched[key])
    if args.quick:
        args.calibration, args.batch_size, args.prompts, args.steps, args.finetune_steps = 4, 2, 2, 2, 3
    return args


def run(args: argparse.Namespace) -> list[dict]:
    setting = Setting.of(args)
    pipe, calibration = setting.pipe, setting.calibration
    full_flops = count_flops(pipe.transformer, calibration[0])
    rows = []
    for brll in args.brll:
        replaced = copy.deepcopy(pipe)
        blockprune.compress(replaced, adapter=ADAPTER[args.model], ratio=brll["ratio"], order=brll["blocks"],
                            calibration=calibration[:2], sandwich=False, progress=False, cache_dir=False)
        target = count_flops(replaced.transformer, calibration[0])
        del replaced
        keep = keep_for_flops(pipe.transformer, calibration[0], target)
        for lr in args.lrs:
            model = copy.deepcopy(pipe)
            started = time.perf_counter()
            l1_prune(model.transformer, keep)
            losses = finetune(model.transformer, pipe.transformer, calibration, args.finetune_steps, lr=lr,
                              seed=args.seed)
            seconds = time.perf_counter() - started
            row = {"model": args.model, "seed": args.seed, "ratio": brll["ratio"], "label": f"width + FT {lr:.0e}",
                   "keep": keep, "lr": lr, "finetune_steps": args.finetune_steps, "compress_s": seconds,
                   "flops": count_flops(model.transformer, calibration[0]) / full_flops,
                   "brll_flops": target / full_flops, "losses": losses[:: max(1, len(losses) // 20)],
                   **setting.scores(model, args.steps)}
            rows.append(row)
            print(f"{args.model} {brll['ratio']:.0%} {row['label']:<18} keep {keep:.3f} psnr {row['psnr']:6.2f} "
                  f"acc {row['accuracy']:.3f} {seconds:6.1f} s", flush=True)
            del model
            write_rows(args, "width-baseline", rows)  # after each row, so a run cut short keeps what it finished
    return rows


def print_table(rows: list[dict], brll_rows: list[dict]) -> None:
    print(f"{'model':<10} {'ratio':>5} {'method':<18} {'FLOPs':>6} {'PSNR':>6} {'SSIM':>6} {'acc':>6} "
          f"{'frechet':>8} {'s':>6}")
    for brll in brll_rows:
        group = [r for r in rows if r["ratio"] == brll["ratio"]]
        flops = group[0]["brll_flops"] if group else float("nan")
        for row in [{**brll, "label": "BRLL + ST (auto)", "flops": flops}, *group]:
            print(f"{row['model']:<10} {row['ratio']:>5.0%} {row['label']:<18} {row['flops']:6.3f} {row['psnr']:6.2f} "
                  f"{row['ssim']:6.3f} {row['accuracy']:6.3f} {row['frechet']:8.4f} {row['compress_s']:6.1f}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # its bf16 backward fails on these shapes
    rows = run(args)
    print_table(rows, args.brll)
    return rows


if __name__ == "__main__":
    main()
