"""What the size of healing's fresh-noise confirmation decides, over heal_confirmation.py runs.

    python benchmarks/heal_confirmation_sizes.py DIR [DIR ...] --output docs/results/heal-confirmation-sizes/summary.json

Each run of ``heal_confirmation.py --fresh N --sizes ...`` keeps healing's best weights whatever the confirmation says
and records the verdict a confirmation of each size would have given (its samples nest). Here, for each size: which
heals it keeps, and what that does to the sampled images, the heal's change of teacher PSNR where it is kept and 0
where the start is put back. Per run, then per model and ratio (mean over seeds), then in all; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from blockprune.sandwich.heal_check import CONFIDENCE_Z


def load(folders: list[Path]) -> list[dict]:
    """Every heal_confirmation.py JSON under ``folders``, in name order."""
    runs = []
    for folder in folders:
        for path in sorted(folder.rglob("heal-confirmation-*.json")):
            runs.append(json.loads(path.read_text(encoding="utf-8")))
    return runs


def summarise(runs: list[dict]) -> dict:
    """Per run, per cell and in all: for each confirmation size, the heals kept and the images' mean change."""
    sizes = sorted({int(s) for r in runs for s in (r.get("fresh_by_size") or {})})
    rows, cells = [], defaultdict(list)
    for run in runs:
        image = run["psnr_change"]
        by_size = run.get("fresh_by_size") or {}
        kept = {s: str(s) in by_size and by_size[str(s)]["signed_rank_z"] < -CONFIDENCE_Z for s in sizes}
        row = {"model": run["model"], "ratio": run["ratio"], "seed": run["seed"], "best_step": run["best_step"],
               "steps_run": run["steps_run"], "image_change": image["mean"],
               "image_se": image["std"] / math.sqrt(image["n"]),
               "z": {s: by_size[str(s)]["signed_rank_z"] if str(s) in by_size else None for s in sizes},
               "n": {s: by_size[str(s)]["n"] if str(s) in by_size else 0 for s in sizes},
               "kept": kept, "gain": {s: image["mean"] if kept[s] else 0.0 for s in sizes}}
        rows.append(row)
        cells[(run["model"], run["ratio"])].append(row)
    cell_rows = [{"model": m, "ratio": r, "runs": len(c),
                  "gain": {s: sum(x["gain"][s] for x in c) / len(c) for s in sizes},
                  "kept": {s: sum(x["kept"][s] for x in c) for s in sizes}}
                 for (m, r), c in sorted(cells.items())]
    overall = {s: {"mean_gain_over_cells": sum(c["gain"][s] for c in cell_rows) / max(1, len(cell_rows)),
                   "kept": sum(c["kept"][s] for c in cell_rows),
                   "losses_kept": sum(1 for x in rows if x["kept"][s] and x["image_change"] < 0),
                   "worst_kept": min([x["gain"][s] for x in rows] or [0.0])} for s in sizes}
    return {"sizes": sizes, "runs": rows, "cells": cell_rows, "overall": overall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, default=None, help="JSON for the summary")
    args = parser.parse_args(argv)
    summary = summarise(load(args.folders))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=1) + "\n")
    sizes = summary["sizes"]
    head = "".join(f" {'z@' + str(s):>8}" for s in sizes)
    print(f"{'run':<22} {'step':>7} {'images dB':>12}{head}")
    for r in summary["runs"]:
        zs = "".join(f" {r['z'][s]:>7.2f}{'*' if r['kept'][s] else ' '}"
                     if r["z"][s] is not None else f" {'-':>8}" for s in sizes)
        print(f"{r['model'] + ' ' + str(round(r['ratio'] * 100)) + '% s' + str(r['seed']):<22} "
              f"{str(r['best_step']) + '/' + str(r['steps_run']):>7} {r['image_change']:>+6.2f} ±{r['image_se']:.2f}{zs}")
    print("\n(* kept at that size)\n")
    print(f"{'cell':<22} {'runs':>4}" + "".join(f" {'gain@' + str(s):>9} {'kept':>4}" for s in sizes))
    for c in summary["cells"]:
        print(f"{c['model'] + ' ' + str(round(c['ratio'] * 100)) + '%':<22} {c['runs']:>4}"
              + "".join(f" {c['gain'][s]:>+9.2f} {c['kept'][s]:>4}" for s in sizes))
    print(f"{'all cells':<22} {'':>4}" + "".join(
        f" {summary['overall'][s]['mean_gain_over_cells']:>+9.2f} {summary['overall'][s]['kept']:>4}" for s in sizes))
    print("losses kept: " + ", ".join(f"@{s}: {summary['overall'][s]['losses_kept']} (worst "
                                      f"{summary['overall'][s]['worst_kept']:+.2f} dB)" for s in sizes))
    return summary


if __name__ == "__main__":
    main()
