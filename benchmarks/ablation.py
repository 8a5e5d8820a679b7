"""The paper's ablations in miniature, on the project's trained small models.

    python benchmarks/ablation.py --model flux-small --seed 0      # one seed: every configuration, JSON out
    python benchmarks/ablation.py --model flux-small --summarize   # mean ± std over the seeds' JSON; table last
    python benchmarks/ablation.py --quick --seed 0 --output /tmp/a # CPU smoke run (tiny counts)

Configurations (FLUX-like model; SD3-like: the ratio sweep and the method group only):
- ratio sweep 0 / 10 / 20 / 30 %, BRLL + sandwich training (ST), blocks in importance order (paper Table 6);
- at 20 %: BRLL without ST, deletion (residual branch skipped) with the same ST, deletion without ST, all on
  the blocks BRLL + ST chose for that seed (Table 4, Fig. 6);
- order start2end / end2start (Table 5), and importance by ``fit_residual`` and by ``output_mse`` with
  ``ablation="replace"``; sandwich width 1 / 5 (Fig. 7), target global; the 20 % row is the ``output_mse``
  importance / width 3 / local one;
- width pruning at matched FLOPs: L1-norm structured pruning of attention heads and MLP channels, then the
  whole model fine-tuned to the unpruned one's output on the same calibration batches, for as many steps as
  ST took in all (the paper's "FLUX-Pruning" rows; ``benchmarks/width_pruning.py``).
A seed draws its own calibration data (and the split and training order); every configuration is evaluated
on the same prompts and noise: teacher fidelity (PSNR, SSIM against the unpruned model's images), attribute
accuracy, and the checker's Fréchet distance to dataset images. Seed 0 also writes image grids.
Latency does not depend on weight values: ``--latency`` (run alone on the machine, after the seeds) rebuilds
each configuration of seed 0 with its blocks and widths, without training, and times it on the device and
on the CPU against the full model in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from width_pruning import finetune, keep_for_flops, l1_prune  # noqa: E402

import blockprune  # noqa: E402
from blockprune.discovery.flops import count_flops, count_parameters
from blockprune.errors import BlockpruneError
from blockprune.runtime.forward import output_tensor, to_device
from blockprune.toy import (
    ToyPipeline,
    attribute_accuracy,
    calibration_batches,
    checker_frechet_distance,
    dataset_images,
    evaluation_prompts,
    generate,
    save_image_grid,
    teacher_fidelity,
)

GRID_PROMPTS = 8
# (group, label, ratio, compress options); ratio 0 is the unpruned model, "width pruning" is not compress
FLUX_CONFIGS = [
    ("ratio", "full", 0.0, {}),
    ("ratio", "BRLL+ST 10%", 0.1, {}),
    ("ratio", "BRLL+ST 20%", 0.2, {}),
    ("ratio", "BRLL+ST 30%", 0.3, {}),
    ("method", "BRLL 20%", 0.2, {"sandwich": False}),
    ("method", "deletion+ST 20%", 0.2, {"surrogate": "identity"}),
    ("method", "deletion 20%", 0.2, {"surrogate": "identity", "sandwich": False}),
    ("method", "width pruning+FT", 0.2, {}),
    ("method", "BRLL+ST lr 1e-3 20%", 0.2, {"sandwich_lr": 1e-3}),
    ("order", "start2end 20%", 0.2, {"order": "start2end"}),
    ("order", "end2start 20%", 0.2, {"order": "end2start"}),
    ("order", "fit_residual 20%", 0.2, {"importance": "fit_residual"}),
    ("order", "mse replace 20%", 0.2, {"ablation": "replace"}),
    ("width", "ST width 1 20%", 0.2, {"sandwich_width": 1}),
    ("width", "ST width 5 20%", 0.2, {"sandwich_width": 5}),
    ("target", "ST global 20%", 0.2, {"sandwich_target": "global"}),
]
SD3_CONFIGS = [  # 8 blocks: 1, 2 and 3 replaced
    ("ratio", "full", 0.0, {}),
    ("ratio", "BRLL+ST 12.5%", 0.125, {}),
    ("ratio", "BRLL+ST 25%", 0.25, {}),
    ("ratio", "BRLL+ST 37.5%", 0.375, {}),
    ("method", "BRLL 25%", 0.25, {"sandwich": False}),
    ("method", "deletion+ST 25%", 0.25, {"surrogate": "identity"}),
    ("method", "deletion 25%", 0.25, {"surrogate": "identity", "sandwich": False}),
]
REFERENCE = {"flux-small": "BRLL+ST 20%", "sd3-small": "BRLL+ST 25%"}  # whose blocks the method group reuses
ADAPTER = {"flux-small": "flux", "sd3-small": "sd3"}
METRICS = ("psnr", "ssim", "accuracy", "frechet", "params", "flops", "compress_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(REFERENCE), default="flux-small")
    parser.add_argument("--seed", type=int, default=0, help="calibration / split / training seed of this run")
    parser.add_argument("--summarize", action="store_true", help="combine the seeds' JSON in --output; no run")
    parser.add_argument("--latency", action="store_true", help="time seed 0's configurations (run it alone)")
    parser.add_argument("--calibration", type=int, default=64, help="calibration batches (default 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per calibration batch (default 8)")
    parser.add_argument("--prompts", type=int, default=256, help="evaluation prompts (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--sandwich-steps", type=int, default=100, help="ST optimizer steps per stage (default 100)")
    parser.add_argument("--sandwich-lr", type=float, default=1e-4, help="ST learning rate (default 1e-4)")
    parser.add_argument("--importance", default="output_mse",
                        help="importance of the reference rows (default output_mse, as in docs/results.md)")
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="run only these configurations (and 'full')")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "docs/results/ablation")))
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny counts")
    args = parser.parse_args(argv)
    if args.quick:
        args.calibration, args.batch_size, args.prompts, args.steps, args.sandwich_steps = 8, 2, 8, 4, 3
    return args


def configs(args: argparse.Namespace) -> list[tuple[str, str, float, dict]]:
    table = FLUX_CONFIGS if args.model == "flux-small" else SD3_CONFIGS
    if args.only:
        unknown = sorted(set(args.only) - {c[1] for c in table})
        if unknown:
            raise SystemExit(f"unknown configuration {unknown[0]!r}; known: {', '.join(c[1] for c in table)}")
        table = [c for c in table if c[1] in args.only or c[2] == 0 or c[1] == REFERENCE[args.model]]
    return table


def latency(transformer: torch.nn.Module, batch: dict[str, Any], repeats: int) -> float:
    """Median seconds of one forward pass on ``batch`` (on the transformer's device)."""
    device = next(transformer.parameters()).device
    batch = to_device(batch, device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            output_tensor(transformer(**batch))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def latencies(transformer: torch.nn.Module, batch: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Forward latency on ``batch`` on the device (when it is not the CPU) and on the CPU."""
    result = {}
    if args.device != "cpu":
        result["device_s"] = latency(transformer, batch, 50)
    result["cpu_s"] = latency(copy.deepcopy(transformer).to("cpu"), batch, 10)
    return result


def run_config(pipe, label, ratio, options, calibration, reference, args) -> tuple[ToyPipeline, dict]:
    """Compress a copy of ``pipe`` as the configuration says; returns it with what it cost."""
    model = copy.deepcopy(pipe)
    started = time.perf_counter()
    if label == "width pruning+FT":
        keep = keep_for_flops(model.transformer, calibration[0], reference["flops"])
        l1_prune(model.transformer, keep)
        steps = reference["stages"] * args.sandwich_steps
        finetune(model.transformer, pipe.transformer, calibration, steps, lr=args.sandwich_lr, seed=args.seed)
        extra = {"keep": keep, "finetune_steps": steps}
    elif ratio > 0:
        options = dict(options)
        if "order" not in options and ("surrogate" in options or options.get("sandwich") is False):
            options["order"] = reference["blocks"]
        options = {"sandwich_steps": args.sandwich_steps, "sandwich_lr": args.sandwich_lr, "importance": args.importance,
                   **options}
        if options.get("sandwich", True):
            options.setdefault("heal_steps", 0)  # the paper's method: sandwich training, no global healing
        blockprune.compress(model, adapter=ADAPTER[args.model], ratio=ratio, calibration=calibration, seed=args.seed,
                            progress=False, cache_dir=Path(tempfile.gettempdir()) / "blockprune-ablation", **options)
        plan = blockprune.plan(model)
        extra = {"blocks": plan.replaced_names, "stages": len(plan.stages)}
    else:
        extra = {}
    extra["compress_s"] = time.perf_counter() - started
    extra["params"] = count_parameters(model.transformer)
    extra["flops"] = count_flops(model.transformer, calibration[0])
    return model, extra


def time_seed0(args: argparse.Namespace) -> dict:
    """Device and CPU latency of seed 0's configurations, rebuilt without training, as ratios to the full model."""
    run = json.loads((args.output / f"{args.model}-seed0.json").read_text(encoding="utf-8"))
    pipe = ToyPipeline.from_pretrained(args.model).to(args.device)
    calibration = to_device(calibration_batches(pipe, 4, seed=1000, batch_size=args.batch_size), pipe.device)
    batch = to_device(calibration_batches(pipe, 1, seed=7, batch_size=2 * args.batch_size)[0], pipe.device)
    timed = {}
    for row in run["rows"]:
        if "error" in row:
            continue
        model = copy.deepcopy(pipe)
        if "keep" in row:
            l1_prune(model.transformer, row["keep"])
        elif row.get("blocks"):
            blockprune.compress(model, adapter=ADAPTER[args.model], ratio=row["ratio"], calibration=calibration,
                                order=row["blocks"], sandwich=False, progress=False, cache_dir=False)
        timed[row["label"]] = latencies(model.transformer, batch, args)
        print(f"{row['label']:<20} {timed[row['label']]}", flush=True)
    return {"model": args.model, "device": run["device"] if args.device != "cpu" else "cpu", "batch": 2 * args.batch_size,
            "latency_s": timed}


def run_seed(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    pipe = ToyPipeline.from_pretrained(args.model).to(args.device)
    calibration = to_device(calibration_batches(pipe, args.calibration, seed=1000 + args.seed, batch_size=args.batch_size),
                            pipe.device)
    prompts = evaluation_prompts(args.prompts, "train", seed=30_000)
    seeds = list(range(30_000, 30_000 + args.prompts))
    reference_images = dataset_images(prompts, seed=30_000)
    rows, grids, teacher, reference = [], {}, None, {}
    for group, label, ratio, options in configs(args):
        try:
            model, row = run_config(pipe, label, ratio, options, calibration, reference, args)
        except BlockpruneError as error:  # e.g. sandwich training diverged: report it, go on
            rows.append({"group": group, "label": label, "ratio": ratio, "seed": args.seed, "error": str(error)})
            print(f"{label:<20} failed: {error}", flush=True)
            continue
        images = generate(model, prompts, seeds, args.steps)
        if teacher is None:
            teacher = images
        row.update({"group": group, "label": label, "ratio": ratio, "seed": args.seed,
                    **teacher_fidelity(images, teacher), **attribute_accuracy(images, prompts),
                    "frechet": checker_frechet_distance(images, reference_images)})
        if label == REFERENCE[args.model]:
            reference = {"blocks": row["blocks"], "stages": row["stages"], "flops": row["flops"]}
        if args.seed == 0:
            grids[label] = images[:GRID_PROMPTS]
        rows.append(row)
        write_json(args, rows)  # after each configuration, so a run cut short keeps what it finished
        print(f"{label:<20} psnr {row['psnr']:6.2f} ssim {row['ssim']:.3f} acc {row['accuracy']:.3f} "
              f"frechet {row['frechet']:.4f} {row['compress_s']:6.1f} s", flush=True)
        del model
    if grids:
        write_grids(grids, prompts[:GRID_PROMPTS], args)
    return write_json(args, rows)


def write_json(args: argparse.Namespace, rows: list[dict]) -> dict:
    result = {"model": args.model, "seed": args.seed, "settings": {k: str(v) for k, v in vars(args).items()},
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "rows": rows}
    path = args.output / f"{args.model}-seed{args.seed}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def write_grids(grids: dict[str, torch.Tensor], prompts: list[str], args: argparse.Namespace) -> None:
    groups = {"methods": [c[1] for c in configs(args) if c[0] in ("method",) or c[1] == REFERENCE[args.model]],
              "ratios": [c[1] for c in configs(args) if c[0] == "ratio"]}
    for name, labels in groups.items():
        rows = {"original": grids["full"], **{label: grids[label] for label in labels if label in grids and label != "full"}}
        save_image_grid(rows, args.output / f"{args.model}-{name}.png")
    (args.output / f"{args.model}-grid-prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")


def summarize(args: argparse.Namespace) -> list[dict]:
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(args.output.glob(f"{args.model}-seed*.json"))]
    if not runs:
        raise SystemExit(f"no {args.model}-seed*.json in {args.output}; run with --seed first")
    labels = list(dict.fromkeys(row["label"] for run in runs for row in run["rows"]))
    full = {run["seed"]: next(r for r in run["rows"] if r["ratio"] == 0) for run in runs}
    latency_file = args.output / f"{args.model}-latency.json"
    timed = json.loads(latency_file.read_text(encoding="utf-8"))["latency_s"] if latency_file.exists() else {}
    summary = []
    for label in labels:
        rows = [r for run in runs for r in run["rows"] if r["label"] == label and "error" not in r]
        failed = [r["error"] for run in runs for r in run["rows"] if r["label"] == label and "error" in r]
        entry = {"label": label, "seeds": len(rows), "failed": failed}
        for metric in METRICS if rows else ():
            values = [r[metric] / full[r["seed"]][metric] if metric in ("params", "flops") else r[metric] for r in rows]
            entry[metric] = statistics.mean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for metric in ("device_s", "cpu_s"):
            if label in timed and metric in timed[label]:
                entry[metric.replace("_s", "_latency")] = timed[label][metric] / timed["full"][metric]
        summary.append(entry)
    (args.output / f"{args.model}-summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"{args.model}: {len(runs)} seeds ({', '.join(str(r['seed']) for r in runs)}), {runs[0]['device']}, torch {runs[0]['torch']}")
    print(f"{'configuration':<18} {'PSNR':>13} {'SSIM':>13} {'accuracy':>13} {'Fréchet':>15} {'params':>6} {'FLOPs':>6} "
          f"{'GPU lat':>7} {'CPU lat':>7}")
    for e in summary:
        if not e["seeds"]:
            print(f"{e['label']:<18} failed in every seed: {e['failed'][0]}")
            continue
        spread = lambda m, f: f"{e[m]:{f}} ± {e[m + '_std']:{f}}"  # noqa: E731
        lat = lambda m: f"{e[m]:.3f}" if m in e else "-"  # noqa: E731
        print(f"{e['label']:<18} {spread('psnr', '5.2f'):>13} {spread('ssim', '.3f'):>13} {spread('accuracy', '.3f'):>13} "
              f"{spread('frechet', '.4f'):>15} {e['params']:6.3f} {e['flops']:6.3f} {lat('device_latency'):>7} {lat('cpu_latency'):>7}")
    return summary


def main(argv: list[str] | None = None) -> Any:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        return summarize(args)
    if args.latency:
        result = time_seed0(args)
        (args.output / f"{args.model}-latency.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        return result
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    result = run_seed(args)
    print(f"wrote {args.output / f'{args.model}-seed{args.seed}.json'}")
    return result


if __name__ == "__main__":
    main()
