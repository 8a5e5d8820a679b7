"""Train the project's small models on the toy shapes dataset and write their weights.

Trains a FLUX-like (``FluxTransformer2DModel``, 6 double + 14 single blocks) and an SD3-like
(``SD3Transformer2DModel``, 8 joint blocks) text-to-image model on patchified 32 × 32 pixels, each with
its own word-level text encoder, by rectified flow within a wall-clock budget per model. Afterwards it
picks the weights (EMA or last) and classifier-free guidance scale with the best attribute accuracy on
validation samples, measures attribute accuracy on fresh seeds (training captions and held-out ones),
and writes ``{name}.json``, ``{name}.transformer.safetensors`` and ``{name}.text_encoder.safetensors``
(fp16) to ``--output`` (default ``blockprune/toy/weights/``) and, when ``$OUT`` is set, to ``$OUT``.
Prints a table last.

    python benchmarks/train_small_models.py                       # both models, on CUDA when there is one
    python benchmarks/train_small_models.py --smoke               # a few CPU steps on tiny widths, writes nothing
    python benchmarks/train_small_models.py --evaluate --eval-images 64   # measure the saved weights again
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from blockprune.toy.evaluation import (
    attribute_accuracy,
    checker_frechet_distance,
    dataset_images,
    evaluation_prompts,
    generate,
)
from blockprune.toy.models import ToyConfig
from blockprune.toy.pipeline import WEIGHTS_DIR, ToyPipeline
from blockprune.toy.training import TrainingSettings, load_ema, train

MAX_FILE_BYTES = 16_000_000
FAMILY = {"flux-small": "flux", "sd3-small": "sd3", "flux-deep": "flux"}
VALIDATION_SEED, TEST_SEED = 10_000, 20_000  # noise seeds for weight/guidance selection and for the reported figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(FAMILY), default=["flux-small", "sd3-small"])
    parser.add_argument("--minutes-flux", type=float, default=6.0, help="training budget of flux-small (default 6)")
    parser.add_argument("--minutes-sd3", type=float, default=6.0, help="training budget of sd3-small (default 6)")
    parser.add_argument("--minutes-deep", type=float, default=8.0, help="training budget of flux-deep (default 8)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps as well")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--flux-width", type=int, default=128)
    parser.add_argument("--flux-blocks", type=int, nargs=2, default=[6, 14], metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--deep-width", type=int, default=64, help="flux-deep: FLUX.1-dev's depth, a narrow width")
    parser.add_argument("--deep-blocks", type=int, nargs=2, default=[19, 38], metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--sd3-width", type=int, default=128)
    parser.add_argument("--sd3-blocks", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--text-width", type=int, default=128)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=1024, help="images per accuracy measurement")
    parser.add_argument("--eval-steps", type=int, default=20, help="Euler steps when sampling for evaluation")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 2.0, 3.5, 5.0],
                        help="classifier-free guidance scales to choose from")
    parser.add_argument("--output", type=Path, default=None, help=f"where to write the weights (default {WEIGHTS_DIR})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block (not tried on GPU yet)")
    parser.add_argument("--smoke", action="store_true", help="a few CPU steps on tiny widths; writes only with --output")
    parser.add_argument("--evaluate", action="store_true",
                        help="train nothing: measure the saved weights in --output again (on CPU, pass e.g. --eval-images 64)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.max_steps, args.minutes_flux, args.minutes_sd3 = "cpu", args.max_steps or 40, 0.0, 0.0
        args.batch_size, args.lr, args.warmup_steps = 16, 3e-3, 5
        args.flux_width = args.sd3_width = args.text_width = 16
        args.heads, args.text_layers, args.flux_blocks, args.sd3_blocks = 2, 1, [2, 2], 2
        args.deep_width, args.deep_blocks = 16, [3, 4]
        args.eval_images, args.eval_steps, args.guidance_scales = 8, 2, [1.0, 2.0]
    elif args.output is None:
        args.output = WEIGHTS_DIR
    return args


def model_config(name: str, args: argparse.Namespace) -> ToyConfig:
    family = FAMILY[name]
    width, blocks = {"flux-small": (args.flux_width, tuple(args.flux_blocks)),
                     "flux-deep": (args.deep_width, tuple(args.deep_blocks)),
                     "sd3-small": (args.sd3_width, (args.sd3_blocks,))}[name]
    return ToyConfig(
        family=family,
        width=width,
        heads=args.heads,
        blocks=blocks,
        patch_size=args.patch_size,
        text_width=args.text_width,
        text_layers=args.text_layers,
        text_heads=args.heads,
        num_inference_steps=args.eval_steps,
    )


def accuracy(pipe: ToyPipeline, prompts: list[str], seed: int, args: argparse.Namespace, scale: float) -> tuple[dict, torch.Tensor]:
    images = generate(pipe, prompts, list(range(seed, seed + len(prompts))), args.eval_steps, scale)
    return attribute_accuracy(images, prompts), images


def choose_weights(pipe: ToyPipeline, result, args: argparse.Namespace) -> tuple[str, float, dict]:
    """Try the last and the EMA weights with each guidance scale on validation samples; keep the best in ``pipe``."""
    prompts = evaluation_prompts(args.eval_images // 2, "train", seed=VALIDATION_SEED)
    last = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()} for part in ("transformer", "text_encoder")}
    scores = {}
    for weights in ("ema", "last"):
        if weights == "ema":
            load_ema(pipe, result)
        else:
            for part, state in last.items():
                getattr(pipe, part).load_state_dict(state)
        for scale in args.guidance_scales:
            scores[(weights, scale)] = accuracy(pipe, prompts, VALIDATION_SEED, args, scale)[0]["accuracy"]
    best = max(scores, key=lambda key: (scores[key], key[0] == "ema", -key[1]))
    if best[0] == "ema":
        load_ema(pipe, result)
    return best[0], best[1], {f"{w} guidance {s:g}": v for (w, s), v in scores.items()}


def save(pipe: ToyPipeline, name: str, metadata: dict, args: argparse.Namespace) -> list[Path]:
    files = list(pipe.save_pretrained(args.output, name, metadata).values())
    too_big = [f"{f} ({f.stat().st_size:,} bytes)" for f in files if f.stat().st_size > MAX_FILE_BYTES]
    if too_big:
        raise SystemExit(f"weight files over {MAX_FILE_BYTES:,} bytes: {', '.join(too_big)}; train with smaller widths")
    out = os.environ.get("OUT")
    if out:
        for f in files:
            shutil.copy2(f, Path(out) / f.name)
    return files


def train_one(name: str, args: argparse.Namespace) -> dict:
    config = model_config(name, args)
    pipe = ToyPipeline.from_config(config, seed=args.seed).to(args.device)
    params = {part: sum(p.numel() for p in getattr(pipe, part).parameters()) for part in ("transformer", "text_encoder")}
    print(f"== {name}: {config.family}, blocks {config.blocks}, width {config.width}, "
          f"{params['transformer']:,} + {params['text_encoder']:,} parameters, on {args.device}", flush=True)
    if args.compile:
        for module in pipe.transformer.modules():
            if type(module).__name__ in ("FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock"):
                module.compile()
    minutes = {"flux-small": args.minutes_flux, "flux-deep": args.minutes_deep, "sd3-small": args.minutes_sd3}[name]
    settings = TrainingSettings(minutes=minutes, max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.lr,
                                warmup_steps=args.warmup_steps, seed=args.seed, log_every=1 if args.smoke else 200)
    result = train(pipe, settings, log=lambda line: print(line, flush=True))
    started = time.perf_counter()
    weights, scale, selection = choose_weights(pipe, result, args)
    pipe.config.guidance_scale = scale
    row = {
        "model": name, "params": sum(params.values()), "steps": result.steps, "batch_size": args.batch_size,
        "first_loss": result.losses[0][1], "final_loss": result.final_loss, "train_seconds": result.seconds,
        "weights": weights, "guidance_scale": scale, **measure(pipe, args), "selection": selection,
        "eval_seconds": time.perf_counter() - started, "losses": result.losses,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "torch": torch.__version__,
    }
    if args.output is not None:
        metadata = {k: v for k, v in row.items() if k != "losses"}
        metadata["eval_steps"] = args.eval_steps
        row["files"] = [str(f) for f in save(pipe.to("cpu"), name, metadata, args)]
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return row


def measure(pipe: ToyPipeline, args: argparse.Namespace) -> dict:
    """Attribute accuracy on fresh seeds (training captions and held-out ones) and the checker Fréchet distance."""
    scale = pipe.config.guidance_scale
    train_prompts = evaluation_prompts(args.eval_images, "train", seed=TEST_SEED)
    held_out_prompts = evaluation_prompts(args.eval_images // 2, "held_out", seed=TEST_SEED)
    train_scores, images = accuracy(pipe, train_prompts, TEST_SEED, args, scale)
    return {
        "accuracy": train_scores,
        "held_out_accuracy": accuracy(pipe, held_out_prompts, TEST_SEED, args, scale)[0],
        "frechet": checker_frechet_distance(images, dataset_images(train_prompts, seed=TEST_SEED)),
    }


def evaluate_saved(name: str, args: argparse.Namespace) -> dict:
    """Measure saved weights again (on ``--device``); training figures come from their JSON."""
    pipe = ToyPipeline.from_pretrained(name, args.output).to(args.device)
    row = {**pipe.metadata, "model": name, **measure(pipe, args)}
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<10} {'params':>10} {'steps':>7} {'final loss':>10} {'train s':>8} {'accuracy':>8} {'held-out':>8} {'guidance':>8} {'weights':>7}"
    print(header)
    for r in rows:
        print(f"{r['model']:<10} {r['params']:>10,} {r['steps']:>7} {r['final_loss']:>10.4f} {r['train_seconds']:>8.1f} "
              f"{r['accuracy']['accuracy']:>8.3f} {r['held_out_accuracy']['accuracy']:>8.3f} {r['guidance_scale']:>8g} {r['weights']:>7}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN's fused attention backward fails on these shapes in bf16 (torch 2.11, cu130: "mha_graph.execute");
        # flash and memory-efficient attention train them fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    rows = []
    for name in args.models:
        rows.append(evaluate_saved(name, args) if args.evaluate else train_one(name, args))
        out = os.environ.get("OUT")
        if out and not (args.smoke or args.evaluate):  # after each model, so a run cut short still reports what it finished
            (Path(out) / "train_small_models.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
