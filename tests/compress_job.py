"""A compress run in its own process, for the fault tests: ``python compress_job.py WORKDIR OUT [KILL_AT]``.

``KILL_AT`` is ``point:n`` (or several, comma-separated): the process kills itself with SIGKILL on the n-th call of
that point's function. ``JOB_IMPORTANCE`` in the environment replaces the importance metric (``output_mse``; with
``auto`` the plan's selection is written next to OUT, as ``.selection.json``); ``JOB_HEAL_STEPS`` turns global
healing on (its report is written next to OUT, as JSON).
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from conftest import flux_batches, make_flux  # noqa: E402  (sets the test environment)

import blockprune  # noqa: E402
import blockprune.brll.replacement  # noqa: E402
import blockprune.runtime.workdir  # noqa: E402
import blockprune.sandwich.heal  # noqa: E402
import blockprune.sandwich.stage  # noqa: E402
import blockprune.scoring.auto  # noqa: E402
import blockprune.scoring.metrics.output_mse  # noqa: E402

POINTS = {
    "scoring": (blockprune.scoring.metrics.output_mse.OutputMSE, "evaluate"),
    "recording": (blockprune.brll.replacement, "record_block"),
    "fitting": (blockprune.brll.replacement, "fit_affine"),
    "training": (blockprune.sandwich.stage, "train_span"),
    "writing": (blockprune.runtime.workdir.os, "replace"),
    "evaluating": (blockprune.scoring.auto.PlanEvaluator, "error"),
    "checking": (blockprune.scoring.auto.PlanEvaluator, "_check"),  # a plan measured, not restored
    "healing": (blockprune.sandwich.heal, "guarded_training"),
}
OPTIONS = {"ratio": 0.5, "sandwich_steps": 8, "sandwich_lr": 1e-3, "progress": False, "cache_dir": False,
           "importance": os.environ.get("JOB_IMPORTANCE", "output_mse"),  # its evaluations: the "scoring" point
           "heal_steps": int(os.environ.get("JOB_HEAL_STEPS", "0"))}
if OPTIONS["heal_steps"]:  # its rate probes record held-out errors after training, whether or not it is kept
    OPTIONS["sandwich_lr"] = "auto"


def kill_on_call(point: str, count: int) -> None:
    owner, name = POINTS[point]
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    workdir, out = sys.argv[1], sys.argv[2]
    for kill_at in sys.argv[3].split(",") if len(sys.argv) > 3 else []:
        point, count = kill_at.split(":")
        kill_on_call(point, int(count))
    model = make_flux(double=2, single=2)
    blockprune.compress(model, calibration=flux_batches(8), workdir=workdir, **OPTIONS)
    torch.save(model.state_dict(), out)
    if OPTIONS["heal_steps"]:
        Path(out).with_suffix(".json").write_text(json.dumps(blockprune.plan(model).heal))
    if OPTIONS["importance"] == "auto":
        Path(out).with_suffix(".selection.json").write_text(json.dumps(blockprune.plan(model).selection))
    print("stages", len(blockprune.plan(model).stages))
