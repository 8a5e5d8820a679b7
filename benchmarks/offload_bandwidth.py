"""Host-to-device copy speed of FLUX.1-dev blocks, by how the host memory is held, and what it does to a forward.

    python benchmarks/offload_bandwidth.py          # one CUDA GPU, about 2 minutes

Offload (``compress(offload=True)``) copies every block's weights to the GPU at every forward, so this copy
bounds it. Compared: ordinary (pageable) CPU tensors, ``Tensor.pin_memory()`` (torch's caching host
allocator, which rounds each allocation up to a power of two) and one exact-size buffer per block pinned in
place with ``cudaHostRegister`` (:class:`blockprune.runtime.offload.HostBuffer`). Median of 10 copies of a double and
a single block, bf16. Then one forward of the whole FLUX.1-dev configuration at 1024² (median of 3): on the
GPU, and under :class:`blockprune.runtime.offload.Offload` with ordinary and with page-locked host memory.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flux_dev  # noqa: E402

from blockprune import plugins
from blockprune.runtime.offload import HostBuffer, Offload


def copy_ms(tensors: list[torch.Tensor], repeats: int = 10) -> float:
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        copies = [t.to("cuda", non_blocking=True) for t in tensors]
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        del copies
    return statistics.median(times[2:])


def forward_s(model, batch, repeats: int = 3) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            started = time.perf_counter()
            model(**batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def whole_model(profile: bool) -> dict[str, float]:
    model = flux_dev.build("cuda", torch.bfloat16)
    batch = flux_dev.inputs(1, 1024, device="cuda")[0]
    seconds = {"on the GPU": forward_s(model, batch)}
    blocks = plugins.get_adapter(model).trace_targets(model)
    for label, lock in (("offload, ordinary memory", False), ("offload, page-locked", True)):
        started = time.perf_counter()
        with Offload(model, blocks, "cuda", page_lock=lock):
            setup = time.perf_counter() - started
            seconds[label] = forward_s(model, batch)
            if profile and lock:
                with torch.profiler.profile() as profiler, torch.no_grad():
                    model(**batch)
                    torch.cuda.synchronize()
                print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        seconds[label + " (set-up)"] = setup
    return seconds


def main() -> None:
    profile = "--profile" in sys.argv[1:]  # print torch.profiler's top operators of one page-locked forward
    model = flux_dev.build("cpu", torch.bfloat16, double=1, single=1)
    rows = []
    for name in ("transformer_blocks.0", "single_transformer_blocks.0"):
        block = model.get_submodule(name)
        tensors = [t.data for t in (*block.parameters(), *block.buffers())]
        gib = sum(t.numel() * t.element_size() for t in tensors) / 2**30
        pageable = copy_ms(tensors)
        pinned = copy_ms([t.pin_memory() for t in tensors])
        buffer = HostBuffer(tensors)
        registered = copy_ms(buffer.views)
        buffer.release()
        rows.append((name, gib, pageable, pinned, registered))
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'block':<28} {'GiB':>6} {'pageable GB/s':>14} {'pin_memory GB/s':>16} {'registered GB/s':>16}")
    for name, gib, *ms in rows:
        rates = [gib * 2**30 / 1e9 / (m / 1e3) for m in ms]
        print(f"{name:<28} {gib:>6.3f} {rates[0]:>14.1f} {rates[1]:>16.1f} {rates[2]:>16.1f}")
    del model
    print(f"\n{'whole FLUX.1-dev forward, 1024²':<40} {'seconds':>8}")
    for label, value in whole_model(profile).items():
        print(f"{label:<40} {value:>8.2f}")


if __name__ == "__main__":
    main()
