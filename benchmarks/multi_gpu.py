"""Importance scoring and the whole compress on 1, 2 and 4 GPUs (torchrun), FLUX.1-dev configuration.

    python benchmarks/multi_gpu.py --gpus 1 2 4            # launches torchrun once per GPU count
    python benchmarks/multi_gpu.py --gpus 1 2 --tiny       # CPU smoke run (gloo), a tiny FLUX

Random bf16 weights, synthetic inputs of the real shapes. Prints wall times, speedup and per-GPU
efficiency against 1 GPU measured in the same run; writes JSON to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    import flux_dev

    import blockprune
    from blockprune.runtime import distributed

    distributed.init_from_environment()
    tiny = args.tiny
    device = distributed.default_device() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not tiny and device.type != "cuda":
        raise SystemExit("multi_gpu.py needs CUDA GPUs (or --tiny)")
    dtype = torch.float32 if tiny else torch.bfloat16
    double, single = (2, 6) if tiny else (19, 38)
    if tiny:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        make = lambda: FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=double, num_single_layers=single,  # noqa: E731
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
        batches = [{"hidden_states": torch.randn(1, 64, 8), "encoder_hidden_states": torch.randn(1, 8, 16),
                    "pooled_projections": torch.randn(1, 8), "timestep": torch.rand(1),
                    "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(8, 3)} for _ in range(args.batches)]
    else:
        make = lambda: flux_dev.build(device, dtype)  # noqa: E731
        batches = flux_dev.inputs(args.batches, args.resolution, device="cpu", dtype=dtype)

    def timed(fn) -> float:
        distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.barrier()
        return time.perf_counter() - start

    model = make()
    measured = {"importance": "output_mse"}  # the metric of the figures in docs/results.md
    scoring = timed(lambda: blockprune.importance(model, adapter="flux", calibration=batches, progress=False,
                                                  cache_dir=False, device=device, **measured))
    compress = timed(lambda: blockprune.compress(model, adapter="flux", ratio=args.ratio, calibration=batches,
                                                 progress=False, cache_dir=False, device=device,
                                                 sandwich_steps=args.steps, sandwich_lr=1e-4, heal_steps=0,
                                                 **measured))
    if distributed.is_main():
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        Path(args.result).write_text(json.dumps({"scoring_s": scoring, "compress_s": compress, "peak_bytes": peak}))
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, default=8, help="calibration batches (batch size 1)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=20, help="sandwich steps per stage")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny FLUX (gloo)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1"}
    for gpus in args.gpus:
        result = Path(tempfile.mkdtemp()) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                   __file__, "--worker", "--result", str(result), "--batches", str(args.batches),
                   "--resolution", str(args.resolution), "--ratio", str(args.ratio), "--steps", str(args.steps)]
        subprocess.run(command + (["--tiny"] if args.tiny else []), check=True, env=env)
        rows.append({"gpus": gpus, **json.loads(result.read_text())})
    base = rows[0]
    for row in rows:
        for phase in ("scoring", "compress"):
            row[f"{phase}_speedup"] = base[f"{phase}_s"] / row[f"{phase}_s"] * 1.0
            row[f"{phase}_efficiency"] = row[f"{phase}_speedup"] / (row["gpus"] / base["gpus"])
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "multi_gpu.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'procs':>5} {'scoring s':>10} {'speedup':>8} {'eff.':>6} {'compress s':>11} {'speedup':>8} {'eff.':>6}")
    for row in rows:
        print(f"{row['gpus']:>5} {row['scoring_s']:>10.1f} {row['scoring_speedup']:>8.2f} {row['scoring_efficiency']:>6.2f}"
              f" {row['compress_s']:>11.1f} {row['compress_speedup']:>8.2f} {row['compress_efficiency']:>6.2f}")


if __name__ == "__main__":
    main()
