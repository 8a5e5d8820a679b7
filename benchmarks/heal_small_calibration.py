"""Healing with little calibration on ``sd3-small``: does the guard keep a heal that lowers the sampled images' PSNR?

    python benchmarks/heal_small_calibration.py --output docs/results/healing-confirmed/small-calibration.json

16 calibration batches of 4 (3 held out), blocks 7 and 6 replaced (the settings of the trained-model tests), sandwich
training, then the same with ``heal_steps=100`` on the model's own trajectory. Teacher PSNR on 16 prompts at 8
sampling steps and on 64 prompts at 20 steps, and what the guard decided. CPU, one thread. A table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import blockprune
from blockprune.toy import (
    ToyPipeline,
    calibration_batches,
    evaluation_prompts,
    generate,
    teacher_fidelity,
)

EVALUATIONS = {"16x8": (16, 8, 100), "64x20": (64, 20, 200)}  # prompts, steps, first noise seed
HEAL_KEYS = ("best_step", "steps_run", "relative_error_before", "relative_error_after", "halves_before",
             "halves_after", "refused", "fresh_error_before", "fresh_error_after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = ToyPipeline.from_pretrained("sd3-small")
    sets = {name: (evaluation_prompts(n, seed=1), list(range(first, first + n)), steps)
            for name, (n, steps, first) in EVALUATIONS.items()}
    teacher = {name: generate(pipe, *settings) for name, settings in sets.items()}
    calibration = calibration_batches(pipe, 16, seed=0)
    rows = {}
    for label, heal_steps in {"ST": 0, "ST + heal 100": 100}.items():
        model = copy.deepcopy(pipe)
        blockprune.compress(model, adapter="sd3", ratio=0.25, order=["transformer_blocks.7", "transformer_blocks.6"],
                            calibration=calibration, heal_steps=heal_steps, progress=False, cache_dir=False)
        heal = blockprune.plan(model).heal
        rows[label] = {name: teacher_fidelity(generate(model, *sets[name]), teacher[name])["psnr"] for name in sets}
        rows[label]["heal"] = {k: heal.get(k) for k in HEAL_KEYS} if heal else None
    args.output.write_text(json.dumps(rows, indent=1))
    print(f"{'variant':<14} {'PSNR 16x8':>10} {'PSNR 64x20':>11}  guard")
    for label, row in rows.items():
        heal = row["heal"]
        guard = "-" if heal is None else ("refused" if heal["refused"] else f"kept step {heal['best_step']}")
        print(f"{label:<14} {row['16x8']:>10.2f} {row['64x20']:>11.2f}  {guard}")


if __name__ == "__main__":
    main()
