"""Block selection on the project's trained models: every built-in signal against ``importance="auto"``.

    python benchmarks/selection.py --model flux-small --seed 0            # LS only, 10 / 20 / 30 %, JSON out
    python benchmarks/selection.py --model flux-deep --seed 0 --sandwich  # with sandwich training too
    python benchmarks/selection.py --quick --output /tmp/s                # CPU smoke run (tiny counts)

Each row compresses a copy of the model with one way of choosing blocks (the fixed orders, each built-in
forward metric, ``output_mse`` with ``ablation="replace"``, ``auto`` checking candidates on a latent trajectory
guided as the pipeline samples, and the same unguided), then samples the same prompts and
noise as the unpruned model: teacher PSNR / SSIM, attribute accuracy, the checker's Fréchet distance, and the
compress wall time. ``auto`` also reports every candidate's held-out output error. A table is printed last.
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

import blockprune
from blockprune.errors import BlockpruneError
from blockprune.toy import ToyPipeline

SIGNALS = {  # label -> compress options
    "start2end": {"order": "start2end"},
    "end2start": {"order": "end2start"},
    "fit_residual": {"importance": "fit_residual"},
    "output_mse": {"importance": "output_mse"},
    "output_mse/replace": {"importance": "output_mse", "ablation": "replace"},
    "block_influence": {"importance": "block_influence"},
    # the default; given the pipeline and batches of unknown prompts, it checks a latent trajectory guided as the
    # pipeline samples (scale 2 for the toy models)
    "auto": {"importance": "auto"},
    "auto/unguided": {"importance": "auto", "guidance_scale": 1.0},  # the trajectory unguided, as before guidance
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(ADAPTER), default="flux-small")
    parser.add_argument("--seed", type=int, default=0, help="calibration seed of this run")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--sandwich", action="store_true", help="also run every row with sandwich training")
    parser.add_argument("--sandwich-only", action="store_true", help="only the rows with sandwich training")
    parser.add_argument("--labels", nargs="+", choices=list(SIGNALS), default=list(SIGNALS),
                        help="which ways of choosing to run, in this order (default all)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration batches (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per calibration batch (default 8)")
    parser.add_argument("--prompts", type=int, default=128, help="evaluation prompts (default 128)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "docs/results/selection")))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="score cache shared by the rows (default: none, every row scores afresh)")
    parser.add_argument("--auto-blocks-from", type=Path, default=None,
                        help="selection.py JSON of the same model and seed: the auto rows replace the blocks its "
                             "least-squares auto row chose at the same ratio instead of selecting again (the "
                             "selection does not depend on sandwich training), so an auto row with sandwich "
                             "training costs what a fixed order does")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny counts")
    args = parser.parse_args(argv)
    if args.quick:
        args.calibration, args.batch_size, args.prompts, args.steps, args.ratios = 6, 2, 4, 2, [0.2]
    return args


def chosen_before(path: Path, args: argparse.Namespace, ratio: float) -> list[str]:
    """The blocks that the least-squares ``auto`` row of ``path`` (same model and seed) replaced at ``ratio``."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    if (saved["model"], saved["seed"]) != (args.model, args.seed):
        raise BlockpruneError(f"{path} is {saved['model']} seed {saved['seed']}, not {args.model} seed {args.seed}")
    found = [r["blocks"] for r in saved["rows"] if r["label"] == "auto" and not r["sandwich"] and r["ratio"] == ratio]
    if not found:
        raise BlockpruneError(f"{path} has no least-squares auto row at ratio {ratio}")
    return found[0]


def run_row(pipe, label, ratio, sandwich, calibration, args) -> tuple[ToyPipeline, dict]:
    model = copy.deepcopy(pipe)
    options = {"sandwich_steps": 3 if args.quick else 100, **SIGNALS[label]}
    reused = label == "auto" and args.auto_blocks_from is not None
    if reused:
        options = {"sandwich_steps": options["sandwich_steps"], "order": chosen_before(args.auto_blocks_from, args, ratio)}
    if sandwich:
        options["heal_steps"] = 0  # the signals compared with sandwich training, not healing
    started = time.perf_counter()
    blockprune.compress(model, adapter=ADAPTER[args.model], ratio=ratio, calibration=calibration, seed=args.seed,
                        sandwich=sandwich, progress=False, cache_dir=args.cache_dir or False, **options)
    plan = blockprune.plan(model)
    return model, {"blocks": plan.replaced_names, "compress_s": time.perf_counter() - started,
                   "selection": plan.selection or None,
                   "blocks_from": str(args.auto_blocks_from) if reused else None}


def run(args: argparse.Namespace) -> list[dict]:
    setting = Setting.of(args)
    rows = []
    for sandwich in (True,) if args.sandwich_only else (False, True) if args.sandwich else (False,):
        for ratio in args.ratios:
            for label in args.labels:
                model, row = run_row(setting.pipe, label, ratio, sandwich, setting.calibration, args)
                row.update({"model": args.model, "seed": args.seed, "ratio": ratio, "sandwich": sandwich,
                            "label": label, **setting.scores(model, args.steps)})
                rows.append(row)
                print(f"{args.model} {ratio:.0%} {'ST' if sandwich else 'LS'} {label:<20} psnr {row['psnr']:6.2f} "
                      f"acc {row['accuracy']:.3f} {row['compress_s']:6.1f} s", flush=True)
                del model
                write_rows(args, "selection", rows)  # after each row, so a run cut short keeps what it finished
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<10} {'ratio':>5} {'ST':>3} {'signal':<20} {'PSNR':>6} {'SSIM':>6} {'acc':>6} {'frechet':>8} "
          f"{'s':>6} {'auto - best (dB)':>16}")
    for row in rows:
        group = [r for r in rows if r["ratio"] == row["ratio"] and r["sandwich"] == row["sandwich"]]
        best = max((r["psnr"] for r in group if not r["label"].startswith("auto")), default=None)
        gap = f"{row['psnr'] - best:+.2f}" if row["label"].startswith("auto") and best is not None else ""
        print(f"{row['model']:<10} {row['ratio']:>5.0%} {'y' if row['sandwich'] else 'n':>3} {row['label']:<20} "
              f"{row['psnr']:6.2f} {row['ssim']:6.3f} {row['accuracy']:6.3f} {row['frechet']:8.4f} "
              f"{row['compress_s']:6.1f} {gap:>16}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # its bf16 backward fails on these shapes (sandwich training)
    rows = run(args)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
