"""Forward time of the FLUX.1-dev configuration under offload, with and without prefetch, against in memory.

    python benchmarks/offload_prefetch.py            # one GPU: bf16, 1024², batches of 1 and of 4
    python benchmarks/offload_prefetch.py --tiny     # smoke run of the script (small FLUX; GPU if there is one)

Random bf16 weights, synthetic inputs of the real shapes. A forward copies every block once whatever its batch,
so each batch size in ``--batches`` gets its own rows: copies weigh less against compute as the batch grows.
Each setting gets one warm-up forward and then
``--repeats`` timed ones, in one process: in memory; ``Offload`` copying each block when it starts
(``prefetch=False``, the behaviour before prefetch); with prefetch one block ahead (the default); and with
``max_gpu_memory``. Peak GPU memory and the share of block runs whose weights were prefetched are printed;
the outputs of every offloaded setting are checked bit-identical to the one without prefetch.
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
import flux_dev

from blockprune.runtime.offload import Offload
from blockprune.toy.flux_dev import build_flux


def timed_forwards(model, batch, repeats: int) -> tuple[float, torch.Tensor]:
    """Seconds per forward (median of ``repeats`` after one warm-up) and the last output on the CPU."""
    times = []
    with torch.no_grad():
        for index in range(repeats + 1):
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = model(**batch).sample
            torch.cuda.synchronize()
            if index:
                times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2], out.float().cpu()


def tiny_batch(size: int) -> dict:
    """Inputs of the ``--tiny`` model (64-wide, 1024 image and 64 text tokens) for a batch of ``size``."""
    batch = flux_dev.inputs(1, 512, 64, batch=size, device="cuda")[0]
    shapes = {"hidden_states": (size, 1024, 64), "encoder_hidden_states": (size, 64, 64), "pooled_projections": (size, 32)}
    return {**batch, **{k: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for k, shape in shapes.items()}}


def settings_for(model, batch, blocks: list[str], max_gpu_memory: float, repeats: int) -> list[dict]:
    """Rows for one batch: in memory, then the offloaded settings (the model ends on the CPU)."""
    model.to("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds, _ = timed_forwards(model, batch, repeats)
    rows = [{"setting": "in memory", "s": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}]
    model.to("cpu")
    torch.cuda.empty_cache()
    settings = {"offload, no prefetch": {"prefetch": False}, "offload, prefetch 1 ahead": {},
                f"offload, max_gpu_memory {max_gpu_memory:g} GiB": {"max_gpu_memory": int(max_gpu_memory * 2**30)}}
    reference = None
    for label, options in settings.items():
        torch.cuda.reset_peak_memory_stats()
        with Offload(model, blocks, "cuda", **options) as offload:
            seconds, out = timed_forwards(model, batch, repeats)
            visits = dict(offload.visits)
        ahead = visits.get(("other", "ahead"), 0) / max(1, sum(visits.values()))
        reference = out if reference is None else reference
        rows.append({"setting": label, "s": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "prefetched": ahead, "bit_identical": bool(torch.equal(out, reference))})
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="samples per forward, one set of rows each")
    parser.add_argument("--max-gpu-memory", type=float, default=8.0, help="GiB for the budgeted setting")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        config = {**flux_dev.FLUX_DEV, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32,
                  "num_attention_heads": 4, "joint_attention_dim": 64, "pooled_projection_dim": 32,
                  "axes_dims_rope": (8, 12, 12)}
        model = build_flux(config, "cuda", torch.bfloat16, 0)
    else:
        model = flux_dev.build("cuda", torch.bfloat16)
    blocks = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))] + [
        f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]
    rows = []
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
              "resolution": 512 if args.tiny else 1024, "repeats": args.repeats, "rows": rows}
    for size in args.batches:
        batch = tiny_batch(size) if args.tiny else flux_dev.inputs(1, 1024, batch=size, device="cuda")[0]
        rows.extend({"batch": size, **row} for row in settings_for(model, batch, blocks, args.max_gpu_memory, args.repeats))
        if os.environ.get("OUT"):  # after each batch size, so that a run cut short keeps the ones before
            Path(os.environ["OUT"], "offload_prefetch.json").write_text(json.dumps(report, indent=2))
    print(f"{report['device']}, torch {report['torch']}, bf16, {report['resolution']}², median of {args.repeats}")
    print(f"{'batch':>5} {'setting':<36} {'s/forward':>10} {'x in memory':>12} {'peak GiB':>9} {'prefetched':>11} {'same':>5}")
    for row in rows:
        base = next(r["s"] for r in rows if r["batch"] == row["batch"])
        print(f"{row['batch']:>5} {row['setting']:<36} {row['s']:>10.3f} {row['s'] / base:>12.2f} {row['peak_gib']:>9.2f} "
              f"{row.get('prefetched', 0):>11.0%} {row.get('bit_identical', '-')!s:>5}")


if __name__ == "__main__":
    main()
