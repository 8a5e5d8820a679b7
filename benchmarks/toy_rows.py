"""What the toy-model quality benchmarks (selection.py, healing.py) share: image scores of a row and its JSON."""

from __future__ import annotations

import argparse
import json

import torch

from blockprune.toy import (
    attribute_accuracy,
    checker_frechet_distance,
    teacher_fidelity,
)


def image_scores(images: torch.Tensor, teacher: torch.Tensor, prompts: list[str], reference: torch.Tensor) -> dict:
    """Teacher PSNR / SSIM, attribute accuracy and the checker's Fréchet distance of sampled images."""
    return {**teacher_fidelity(images, teacher), **attribute_accuracy(images, prompts),
            "frechet": checker_frechet_distance(images, reference)}


def write_rows(args: argparse.Namespace, benchmark: str, rows: list[dict]) -> None:
    """``{benchmark}-{model}-seed{seed}.json`` in ``args.output``: the run's settings and its rows so far."""
    args.output.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    payload = {"model": args.model, "seed": args.seed, "device": device, "calibration": args.calibration,
               "batch_size": args.batch_size, "prompts": args.prompts, "steps": args.steps, "rows": rows}
    (args.output / f"{benchmark}-{args.model}-seed{args.seed}.json").write_text(json.dumps(payload, indent=1) + "\n")
