"""What the toy-model quality benchmarks (selection.py, healing.py, width_baseline.py) share: the trained model with
its calibration and the unpruned model's images, the image scores of a row, and the JSON."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from blockprune.runtime.forward import to_device
from blockprune.toy import (
    ToyPipeline,
    attribute_accuracy,
    calibration_batches,
    checker_frechet_distance,
    dataset_images,
    evaluation_prompts,
    generate,
    psnr,
    teacher_fidelity,
)

ADAPTER = {"flux-small": "flux", "sd3-small": "sd3", "flux-deep": "flux"}  # each trained model's adapter


@dataclass
class Setting:
    """A trained toy model on ``args.device``, its calibration batches (seed 1000 + the run's seed), the evaluation
    prompts and noise seeds (30,000 on), the unpruned model's images of them and the dataset's images."""

    pipe: ToyPipeline
    calibration: list[dict]
    prompts: list[str]
    seeds: list[int]
    teacher: torch.Tensor
    reference: torch.Tensor

    @classmethod
    def of(cls, args: argparse.Namespace, unconditional: float = 0.0) -> Setting:
        """The setting of ``args`` (``model``, ``seed``, ``device``, ``calibration``, ``batch_size``, ``prompts``,
        ``steps``); ``unconditional`` is the share of calibration samples given the empty prompt."""
        torch.manual_seed(args.seed)
        pipe = ToyPipeline.from_pretrained(args.model).to(args.device)
        calibration = to_device(calibration_batches(pipe, args.calibration, seed=1000 + args.seed,
                                                    batch_size=args.batch_size, unconditional=unconditional),
                                pipe.device)
        prompts = evaluation_prompts(args.prompts, "train", seed=30_000)
        seeds = list(range(30_000, 30_000 + args.prompts))
        return cls(pipe, calibration, prompts, seeds, generate(pipe, prompts, seeds, args.steps),
                   dataset_images(prompts, seed=30_000))

    def scores(self, model: ToyPipeline, steps: int) -> dict:
        """:func:`image_scores` of ``model``'s images of the setting's prompts and noise."""
        return image_scores(generate(model, self.prompts, self.seeds, steps), self.teacher, self.prompts,
                            self.reference)


def image_scores(images: torch.Tensor, teacher: torch.Tensor, prompts: list[str], reference: torch.Tensor) -> dict:
    """Teacher PSNR / SSIM, attribute accuracy and the checker's Fréchet distance of sampled images; ``psnr_each``
    holds each prompt's PSNR, so that two rows can be compared prompt by prompt (:func:`paired_difference`)."""
    return {**teacher_fidelity(images, teacher), "psnr_each": psnr(images, teacher).tolist(),
            **attribute_accuracy(images, prompts), "frechet": checker_frechet_distance(images, reference)}


def paired_difference(row: dict, base: dict) -> tuple[float, float]:
    """Mean PSNR change of ``row`` over ``base`` and its standard error, prompt by prompt (nan without ``psnr_each``).

    A 64-prompt mean has an error of its own: each prompt's change varies by 0.8 to 3.5 dB (docs/results.md)."""
    if "psnr_each" not in row or "psnr_each" not in base:
        return float("nan"), float("nan")
    change = torch.tensor(row["psnr_each"], dtype=torch.float64) - torch.tensor(base["psnr_each"], dtype=torch.float64)
    return float(change.mean()), float(change.std() / change.numel() ** 0.5) if change.numel() > 1 else float("nan")


def write_rows(args: argparse.Namespace, benchmark: str, rows: list[dict]) -> None:
    """``{benchmark}-{model}-seed{seed}.json`` in ``args.output``: the run's settings and its rows so far."""
    args.output.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    payload = {"model": args.model, "seed": args.seed, "device": device, "calibration": args.calibration,
               "batch_size": args.batch_size, "prompts": args.prompts, "steps": args.steps, "rows": rows}
    (args.output / f"{benchmark}-{args.model}-seed{args.seed}.json").write_text(json.dumps(payload, indent=1) + "\n")
