"""Which states should a whole-model fine-tune of a compressed model train on? A probe, without blockprune's guard.

    python benchmarks/heal_states_probe.py --model sd3-small --source student   # the compressed model's own sampling
    python benchmarks/heal_states_probe.py --model sd3-small --source teacher   # the unpruned model's sampling
    python benchmarks/heal_states_probe.py --model sd3-small --source calibration  # noised training images
    python benchmarks/heal_states_probe.py --model sd3-small --source images  # end to end, through the sampler

The blocks ``auto`` chose with sandwich training at ``--ratio`` (selection.py's JSON) are replaced with blockprune's
defaults (least squares + sandwich training, no healing); then every weight of the transformer trains (AdamW,
constant rate) to the unpruned transformer's output on minibatches of 16 rows drawn from a pool of inputs: those
the pipeline's transformer is called with while it samples 64 training prompts (20 steps, guidance 2, both halves
of classifier-free guidance; for ``student`` resampled every 100 steps), or the calibration batches. With ``images``
the loss is instead the squared error of the compressed model's sampled images (clamped as the evaluation clamps them)
against the unpruned model's from the same fresh noise, ``--images`` of those prompts a step, backpropagated through
every step of the sampler: the teacher PSNR the evaluation measures, optimized directly. Teacher PSNR /
SSIM, attribute accuracy and Fréchet distance of the sampled evaluation images every ``--every`` steps; the
table last. This motivated ``heal_states="trajectory"`` (docs/results.md).
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

from toy_rows import ADAPTER, Setting

import blockprune
from blockprune.runtime.forward import output_tensor
from blockprune.toy import evaluation_prompts, generate

SELECTION = Path(__file__).resolve().parents[1] / "docs" / "results" / "selection-sandwich"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(ADAPTER), default="sd3-small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--source", choices=("student", "teacher", "calibration", "images"), default="student")
    parser.add_argument("--images", type=int, default=8, help="images a step with --source images")
    parser.add_argument("--clip", type=float, default=0.0, help="clip the gradient to this norm (0: no clipping)")
    parser.add_argument("--selection", type=Path, help="selection.py's JSON (default: the one of --model and --seed)")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--steps", dest="train_steps", type=int, default=300, help="fine-tuning steps")
    parser.add_argument("--every", type=int, default=50, help="steps between evaluations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "docs/results/heal-states-probe")))
    args = parser.parse_args(argv)
    args.calibration, args.batch_size, args.prompts = 32, 8, 64  # as healing.py
    args.steps = 20  # the sampler's steps, for the teacher's images as for the student's
    return args


def sampled_inputs(pipe, prompts: list[str], seeds: list[int]) -> list[dict]:
    """The transformer's inputs while ``pipe`` samples ``prompts``, one row each (both halves of guidance)."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: v.detach().clone() for k, v in kwargs.items()}), with_kwargs=True)
    with torch.no_grad():
        generate(pipe, prompts, seeds, 20)
    handle.remove()
    return rows(calls)


def rows(batches: list[dict]) -> list[dict]:
    """Each batch split into batches of one row (tensors without a batch dimension shared)."""
    out = []
    for batch in batches:
        n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)
        for i in range(n):
            out.append({k: v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                        for k, v in batch.items()})
    return out


def stack(items: list[dict]) -> dict:
    first = items[0]
    return {k: torch.cat([item[k] for item in items]) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 1 else v
            for k, v in first.items()}


def image_loss(teacher, student, prompts: list[str], count: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """The squared error of ``student``'s images of ``count`` of ``prompts`` (drawn with ``generator``, as the noise)
    against ``teacher``'s, both clamped to [-1, 1] as the evaluation clamps them; differentiable in the student."""
    chosen = [prompts[i] for i in torch.randint(len(prompts), (count,), generator=generator).tolist()]
    size = student.config.image_size
    noise = torch.randn((count, 3, size, size), generator=generator).to(student.device, student.dtype)
    scale = student.config.guidance_scale
    with torch.no_grad():
        target = teacher.sample(noise, chosen, steps, scale).float().clamp(-1, 1)
    return ((student.sample(noise, chosen, steps, scale).float().clamp(-1, 1) - target) ** 2).mean()


def write_log(args: argparse.Namespace, log: dict) -> None:
    """``probe-{model}-{source}-seed{seed}.json`` in ``args.output``: the settings and the evaluations so far."""
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"probe-{args.model}-{args.source}-seed{args.seed}.json"
    path.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1) if args.device == "cpu" else torch.backends.cuda.enable_cudnn_sdp(False)
    setting = Setting.of(args)
    name = f"selection-{args.model}-seed{args.seed}" + ("" if args.ratio == 0.2 else "-r10-30")
    chosen = json.loads((args.selection or SELECTION / f"{name}.json").read_text(encoding="utf-8"))["rows"]
    blocks = next(r["blocks"] for r in chosen if r["label"] == "auto" and r["sandwich"] and r["ratio"] == args.ratio)
    student = copy.deepcopy(setting.pipe)
    blockprune.compress(student, adapter=ADAPTER[args.model], ratio=args.ratio, order=blocks,
                        calibration=setting.calibration, seed=args.seed, heal_steps=0, progress=False, cache_dir=False)
    teacher = setting.pipe.transformer
    prompts, seeds = evaluation_prompts(64, "train", seed=777), list(range(50_000, 50_064))  # not the evaluation's
    pool = {"student": lambda: sampled_inputs(student, prompts, seeds),
            "teacher": lambda: sampled_inputs(setting.pipe, prompts, seeds),
            "calibration": lambda: rows(setting.calibration), "images": list}[args.source]
    inputs = pool()
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "blocks": blocks, "evaluations": []}
    student.text_encoder.requires_grad_(False)
    parameters = list(student.transformer.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(args.train_steps + 1):
        if step % args.every == 0:
            log["evaluations"].append({"step": step, **setting.scores(student, args.steps)})
            print(step, {k: round(v, 3) for k, v in log["evaluations"][-1].items() if isinstance(v, float)}, flush=True)
            log["seconds"] = time.perf_counter() - started
            write_log(args, log)  # after each evaluation, so a run cut short keeps what it measured
        if step == args.train_steps:
            break
        if args.source == "student" and (step + 1) % 100 == 0:
            inputs = pool()  # before every 100th step: the states of the model as it is now
        if args.source == "images":
            loss = image_loss(setting.pipe, student, prompts, args.images, args.steps, generator)
        else:
            batch = stack([inputs[i] for i in torch.randint(len(inputs), (16,), generator=generator).tolist()])
            with torch.no_grad():
                target = output_tensor(teacher(**batch)).float()
            loss = ((output_tensor(student.transformer(**batch)).float() - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(parameters, args.clip)
        optimizer.step()
    log["seconds"] = time.perf_counter() - started
    write_log(args, log)
    print(f"{'step':>5} {'PSNR':>6} {'SSIM':>6} {'acc':>6} {'frechet':>8}")
    for row in log["evaluations"]:
        print(f"{row['step']:>5} {row['psnr']:6.2f} {row['ssim']:6.3f} {row['accuracy']:6.3f} {row['frechet']:8.3f}")
    return log


if __name__ == "__main__":
    main()
