"""Sandwich training and global healing on the project's trained models: what each adds over least squares.

    python benchmarks/healing.py --model flux-small --seed 0     # 20 / 10 / 30 %, JSON out after each ratio
    python benchmarks/healing.py --quick --output /tmp/h         # CPU smoke run (tiny counts)

The blocks are chosen once per ratio (``fit_residual``, least squares only, or with ``--blocks-from`` those
that ``auto`` chose in a selection.py run, so that every row replaces the same blocks and only the training
differs), then each row compresses a copy of the model with those blocks:
least squares only; sandwich training at the old defaults (100 steps at lr 1e-4, half the calibration for the
least squares, a quarter of the rest held out; the held-out guard is always on now); at the new defaults
(lr chosen from a grid by probes, every batch not held out both fits and trains, early stop); and the new
defaults with global healing (LoRA on the kept blocks, or with "full" every weight of them). Teacher PSNR / SSIM of sampled images against the unpruned model, attribute
accuracy, the checker's Fréchet distance, and wall time. A table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from toy_rows import ADAPTER, Setting, paired_difference, write_rows

import blockprune
from blockprune.errors import BlockpruneError
from blockprune.sandwich import guard
from blockprune.toy import (
    ToyPipeline,
)

EVERY_TEN = {"sandwich_eval_every": 10}  # a held-out check every 10 steps, the default before 2026-12-07
SHORT = {"sandwich_steps": 100, **EVERY_TEN}  # and 100 steps per stage
# the rows without healing say heal_steps=0 (the default now; it was "auto", which healed these rectified-flow models)
OLD = {"sandwich_lr": 1e-4, "sandwich_split": 0.5, "sandwich_held_out": 0.2,  # held out: ~ the old 0.25 of the half
       "heal_steps": 0, **SHORT}
VARIANTS = {  # label -> (sandwich, options)
    "LS only": (False, {}),
    "ST old defaults": (True, OLD),
    "ST new defaults": (True, {"heal_steps": 0}),
    "ST 100 steps": (True, {"heal_steps": 0, **SHORT}),
    "ST 100 steps + heal 100": (True, {"heal_steps": 100, **SHORT}),
    "ST new + heal 100": (True, {"heal_steps": 100}),
    "ST new + heal 300": (True, {"heal_steps": 300}),
    "ST new + heal 100 full": (True, {"heal_steps": 100, "heal_kept": "full"}),  # every kept weight, not LoRA
    # the heals above train on the model's own trajectory (heal_states="auto" on these rectified-flow models); these
    # on the calibration batches, as healing did before
    "ST new + heal 100 calibration": (True, {"heal_steps": 100, "heal_states": "calibration"}),
    "ST new + heal 300 calibration": (True, {"heal_steps": 300, "heal_states": "calibration"}),
    "ST new + heal 300 full": (True, {"heal_steps": 300, "heal_kept": "full"}),
    # how far sandwich training can go: more steps, an early stop only after many checks without improvement
    "ST 100 steps, patience 10": (True, {"heal_steps": 0, "sandwich_patience": 10, **SHORT}),
    "ST 300 steps": (True, {"heal_steps": 0, "sandwich_steps": 300, "sandwich_patience": 20, **EVERY_TEN}),
    "ST 1000 steps": (True, {"heal_steps": 0, "sandwich_steps": 1000, "sandwich_patience": 20, **EVERY_TEN}),
    "ST 3000 steps": (True, {"heal_steps": 0, "sandwich_steps": 3000}),  # the defaults' check interval and patience
    "ST new, lr 3e-4": (True, {"heal_steps": 0, "sandwich_lr": 3e-4}),  # the rate the 3000-step probes chose, fixed
    "ST new, probes uncooled": (True, {"heal_steps": 0}),  # probes scored mid-flight, the rule before their cool-down
    "ST new, grid 3e-4 to 3e-3": (True, {"heal_steps": 0}),  # lr="auto" probes 3e-4, 1e-3, 3e-3 instead
    "ST 1000 steps + heal 100": (True, {"heal_steps": 100, "sandwich_steps": 1000, "sandwich_patience": 20,
                                        **EVERY_TEN}),
}


# label -> guard module settings for that row: PROBE_COOLDOWN_SHARE (0: the lr="auto" probes scored mid-flight, the
# rule before), LR_GRID (the rates the probes try)
GUARD_SETTINGS = {"ST new, probes uncooled": {"PROBE_COOLDOWN_SHARE": 0.0},
                  "ST new, grid 3e-4 to 3e-3": {"LR_GRID": (3e-4, 1e-3, 3e-3)}}


@contextlib.contextmanager
def guard_module_settings(**values: object) -> Iterator[None]:
    """Set ``blockprune.sandwich.guard`` module settings for one row; put them back afterwards."""
    previous = {name: getattr(guard, name) for name in values}
    for name, value in values.items():
        setattr(guard, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(guard, name, value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(ADAPTER), default="flux-small")
    parser.add_argument("--seed", type=int, default=0, help="calibration and training seed of this run")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.1, 0.3])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--calibration", type=int, default=32, help="calibration batches (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per calibration batch (default 8)")
    parser.add_argument("--prompts", type=int, default=128, help="evaluation prompts (default 128)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "docs/results/healing")))
    parser.add_argument("--blocks-from", type=Path, default=None,
                        help="selection.py JSON: replace the blocks its auto row with sandwich training chose at each "
                             "ratio, instead of fit_residual's")
    parser.add_argument("--unconditional", type=float, default=0.0,
                        help="share of calibration samples with the empty prompt, as CFG sampling feeds them (0.5)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny counts")
    args = parser.parse_args(argv)
    if args.quick:
        args.calibration, args.batch_size, args.prompts, args.steps, args.ratios = 6, 2, 4, 2, [0.2]
    return args


def chosen_blocks(pipe: ToyPipeline, ratio: float, common: dict, selection: Path | None) -> list[str]:
    """The blocks every row replaces: ``fit_residual``'s choice, or the ``auto`` ST row's of ``selection``."""
    if selection is not None:
        rows = json.loads(selection.read_text(encoding="utf-8"))["rows"]
        found = [r["blocks"] for r in rows if r["label"] == "auto" and r["sandwich"] and r["ratio"] == ratio]
        if not found:
            raise BlockpruneError(f"{selection} has no auto row with sandwich training at ratio {ratio}")
        return found[0]
    chooser = copy.deepcopy(pipe)
    blockprune.compress(chooser, ratio=ratio, importance="fit_residual", sandwich=False, **common)
    return blockprune.plan(chooser).replaced_names


def run(args: argparse.Namespace) -> list[dict]:
    setting = Setting.of(args, unconditional=args.unconditional)
    pipe, calibration = setting.pipe, setting.calibration
    common = {"adapter": ADAPTER[args.model], "calibration": calibration, "seed": args.seed, "progress": False,
              "cache_dir": False}
    extra = {"sandwich_steps": 3, "sandwich_eval_every": 1} if args.quick else {}
    rows = []
    for ratio in args.ratios:
        order = chosen_blocks(pipe, ratio, common, args.blocks_from)
        for label in args.variants:
            sandwich, options = VARIANTS[label]
            if args.quick and options.get("heal_steps"):  # 0 stays off
                options = {**options, "heal_steps": 3}
            model = copy.deepcopy(pipe)
            started = time.perf_counter()
            with guard_module_settings(**GUARD_SETTINGS.get(label, {})):
                blockprune.compress(model, ratio=ratio, order=order, sandwich=sandwich, **common,
                                    **{**options, **(extra if sandwich else {})})  # --quick's counts win
            seconds = time.perf_counter() - started
            plan = blockprune.plan(model)
            row = {"model": args.model, "seed": args.seed, "ratio": ratio, "label": label, "compress_s": seconds,
                   "phases_s": plan.seconds, "blocks": order,
                   "stages": [{"before": s.relative_error_before, "after": s.relative_error_after,
                               "best_step": s.best_step, "steps_run": s.steps_run, "lr": s.lr, "lr_errors": s.lr_errors}
                              for s in plan.stages],
                   "heal": plan.heal or None,
                   **setting.scores(model, args.steps)}
            rows.append(row)
            reverted = sum(s["best_step"] == 0 for s in row["stages"])
            print(f"{args.model} {ratio:.0%} {label:<22} psnr {row['psnr']:6.2f} acc {row['accuracy']:.3f} "
                  f"{seconds:6.1f} s, {reverted}/{len(row['stages'])} stages reverted", flush=True)
            del model
            write_rows(args, "healing", rows)  # after each row, so a run cut short keeps what it finished
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<10} {'ratio':>5} {'variant':<22} {'PSNR':>6} {'SSIM':>6} {'acc':>6} {'frechet':>8} {'s':>6} "
          f"{'vs LS (dB) ± s.e.':>18}")
    for row in rows:
        base = next((r for r in rows if r["ratio"] == row["ratio"] and r["label"] == "LS only"), {})
        change, error = paired_difference(row, base)
        print(f"{row['model']:<10} {row['ratio']:>5.0%} {row['label']:<22} {row['psnr']:6.2f} {row['ssim']:6.3f} "
              f"{row['accuracy']:6.3f} {row['frechet']:8.4f} {row['compress_s']:6.1f} {change:>+10.2f} ± {error:.2f}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # its bf16 backward fails on these shapes
    rows = run(args)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
