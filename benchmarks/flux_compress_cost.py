"""What the whole compress(ratio=0.2, sandwich=True) costs on the FLUX.1-dev configuration, with and without offload.

    python benchmarks/flux_compress_cost.py                 # H100: N=8 calibration samples at 1024²
    python benchmarks/flux_compress_cost.py --tiny          # CPU smoke run on a small FLUX

Random bf16 weights, synthetic inputs of the real shapes (4096 image + 512 text tokens). Reports wall time
per phase and peak GPU memory, checks that least-squares memory does not grow with N, and extrapolates to
the paper's 512 + 512 samples (assumptions printed). Writes JSON to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flux_dev  # noqa: E402

import blockprune  # noqa: E402
from blockprune import plugins
from blockprune.brll.recording import record_block
from blockprune.discovery.resolve import resolve_blocks


def build(args, device):
    if args.tiny:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=8,
                                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
        return model

    return flux_dev.build(device, torch.bfloat16)


def inputs(args, count, seed=0):
    if args.tiny:
        g = torch.Generator().manual_seed(seed)
        return [{"hidden_states": torch.randn(1, 64, 64, generator=g), "encoder_hidden_states": torch.randn(1, 16, 64, generator=g),
                 "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.rand(1, generator=g),
                 "guidance": torch.full((1,), 3.5), "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(16, 3)}
                for _ in range(count)]
    return flux_dev.inputs(count, args.resolution, seed=seed)


def least_squares_memory(args, device) -> dict[str, float]:
    """Peak memory of recording one single block's normal equations with N and 4N batches."""
    model = build(args, device).to(device)
    batches = inputs(args, 4 * args.ls_batches)
    block = resolve_blocks(model, plugins.get_adapter(model), batches[0])[-1]
    peaks = {}
    for count in (args.ls_batches, 4 * args.ls_batches):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        record_block(model, block, batches[:count])
        peaks[count] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    del model
    return peaks


def compress_once(args, device, offload: bool) -> dict:
    model = build(args, device)
    model.to("cpu" if offload else device)
    batches = inputs(args, args.samples)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    blockprune.compress(model, adapter="flux", ratio=0.2, calibration=batches, device=device, offload=offload,
                        progress=False, cache_dir=False, score_batches=args.score_batches,
                        sandwich_steps=args.steps, sandwich_lr=1e-4, importance="output_mse")  # as in docs/results.md
    wall = time.perf_counter() - started
    plan = blockprune.plan(model)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    train = sum(s.train_seconds for s in plan.stages)
    result = {"offload": offload, "wall_s": wall, "peak_gib": peak, "phases_s": plan.seconds, "train_s": train,
              "replaced": len(plan.replaced), "blocks": len(plan.blocks), "samples": args.samples,
              "score_batches": args.score_batches, "steps": args.steps,
              "span_error_after": [s.relative_error_after for s in plan.stages]}
    del model
    return result


def extrapolate(row: dict, args) -> dict:
    """Scale each phase to 512 least-squares + 512 training samples (assumptions in the printout)."""
    n = args.samples
    ls_samples = n - round(0.5 * n)
    train_samples = n - ls_samples
    phases = row["phases_s"]
    scoring = phases.get("scoring", 0.0) * args.target_score_batches / args.score_batches
    least_squares = phases.get("least_squares", 0.0) * 512 / ls_samples
    recording = phases.get("sandwich", 0.0) - row["train_s"]
    training = row["train_s"] * args.target_steps / args.steps
    sandwich = recording * 512 / train_samples + training
    return {"scoring_h": scoring / 3600, "least_squares_h": least_squares / 3600, "sandwich_h": sandwich / 3600,
            "total_h": (scoring + least_squares + sandwich) / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="calibration samples (half least squares, half training)")
    parser.add_argument("--score-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="sandwich steps per stage in the measured run")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--ls-batches", type=int, default=2)
    parser.add_argument("--target-score-batches", type=int, default=32, help="extrapolation: scoring batches")
    parser.add_argument("--target-steps", type=int, default=512, help="extrapolation: sandwich steps per stage")
    parser.add_argument("--no-offload", action="store_true", help="skip the offload run")
    parser.add_argument("--offload-only", action="store_true", help="only the offload run")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a small FLUX")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    rows = []
    memory = least_squares_memory(args, device) if not args.offload_only else {}
    if not args.offload_only:
        rows.append(compress_once(args, device, offload=False))
    if not args.no_offload:
        rows.append(compress_once(args, device, offload=True))
    for row in rows:
        row["extrapolated"] = extrapolate(row, args)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": "bfloat16" if not args.tiny else "float32",
              "resolution": args.resolution, "least_squares_peak_gib": memory, "runs": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "flux_compress_cost.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1))
    print(f"\ndevice {report['device']}, torch {report['torch']}, {report['dtype']}, {args.resolution}², "
          f"N={args.samples} samples, score batches {args.score_batches}, {args.steps} sandwich steps/stage")
    if memory:
        (few, a), (many, b) = memory.items()
        print(f"least-squares peak memory: {a:.2f} GiB with {few} batches, {b:.2f} GiB with {many}")
    print(f"{'offload':>7} {'wall s':>8} {'peak GiB':>9} {'scoring':>8} {'lsq':>7} {'sandwich':>9}"
          f" {'extrap. H100-h':>15}")
    for row in rows:
        p = row["phases_s"]
        print(f"{str(row['offload']):>7} {row['wall_s']:>8.1f} {row['peak_gib']:>9.2f} {p.get('scoring', 0):>8.1f}"
              f" {p.get('least_squares', 0):>7.1f} {p.get('sandwich', 0):>9.1f} {row['extrapolated']['total_h']:>15.2f}")
    print(f"extrapolation: 512 + 512 samples, {args.target_score_batches} scoring batches, "
          f"{args.target_steps} sandwich steps per stage")


if __name__ == "__main__":
    main()
