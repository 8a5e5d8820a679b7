"""compress under a launcher: ``torchrun --standalone --nproc_per_node N distributed_job.py OUT`` (or without
torchrun for the single-process reference). Each rank saves what it ended with to ``OUT-<rank>.pt``."""

import sys

import torch
import torch.distributed as dist
from conftest import flux_batches, make_flux  # noqa: E402  (sets the test environment)

import blockprune  # noqa: E402
from blockprune import plugins
from blockprune.brll.recording import record_block
from blockprune.discovery.resolve import resolve_blocks

if __name__ == "__main__":
    out = sys.argv[1]
    calibration = flux_batches(9)  # 2 held out (as many as ranks), the other 7 fit the least squares and train
    model = make_flux(double=2, single=2)
    block = resolve_blocks(model, plugins.get_adapter(model), calibration[0])[2]
    accumulators = record_block(model, block, calibration)
    normal = {s: acc.normal_equations() for s, acc in accumulators.items()}
    blockprune.compress(model, ratio=0.5, calibration=calibration, sandwich_steps=6, sandwich_lr=1e-3,
                        sandwich_batch_size=3, sandwich_eval_every=2, heal_steps=6, progress=False, cache_dir=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    plan = blockprune.plan(model)
    torch.save({"state": model.state_dict(), "normal": normal, "scores": plan.scores, "replaced": plan.replaced_names,
                "losses": [s.loss_after for s in plan.stages], "heal": plan.heal,
                "selection": {k: plan.selection[k] for k in ("candidates", "chosen", "checked_on")}}, f"{out}-{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()
