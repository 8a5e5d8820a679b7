"""Why ``auto``'s plan check and the sampled images can disagree: two plans, scored every way.

    python benchmarks/selection_check.py --model sd3-small --seed 2 \
        --plan transformer_blocks.7 transformer_blocks.6 --plan transformer_blocks.7 transformer_blocks.5

Each plan's blocks are replaced by least-squares fits (no sandwich training), as ``benchmarks/selection.py``
does, and the compressed model is compared with the unpruned one by: the held-out latent trajectory error that
``importance="auto"`` checks (8 Euler steps from seeded noise, the held-out batches' text), unguided as it was
and guided at the pipeline's scale as it is now, and
teacher PSNR of sampled images at 8 and 20 steps, unguided and with the model's guidance. The column where the
plans' order flips is the difference that misleads the check. A table is printed last; JSON to --output.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from selection import ADAPTER
from toy_rows import image_scores

import blockprune
from blockprune import plugins
from blockprune.runtime.forward import to_device
from blockprune.scoring.auto import TRAJECTORY_STEPS, split_for_selection
from blockprune.scoring.guidance import resolve_guidance
from blockprune.scoring.trajectory import latent_check, relative_error
from blockprune.toy import (
    ToyPipeline,
    calibration_batches,
    dataset_images,
    evaluation_prompts,
    generate,
)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(ADAPTER), default="sd3-small")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--plan", nargs="+", action="append", required=True, help="block names (give it twice or more)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    pipe = ToyPipeline.from_pretrained(args.model)
    calibration = to_device(calibration_batches(pipe, 32, seed=1000 + args.seed, batch_size=8), pipe.device)
    _, held = split_for_selection(calibration, 0.25)
    adapter = plugins.get_adapter(pipe.transformer, ADAPTER[args.model])
    guidance = resolve_guidance(adapter, pipe, None, None)  # the pipeline's own scale, as compress takes it
    time_scale = adapter.flow_time_scale
    checks = {"check_error": None, "guided_check_error": guidance}
    with torch.no_grad():
        references = {k: latent_check(pipe.transformer, held[:8], time_scale, TRAJECTORY_STEPS, g)()
                      for k, g in checks.items()}
    prompts = evaluation_prompts(args.prompts, "train", seed=30_000)
    seeds = list(range(30_000, 30_000 + args.prompts))
    truth = dataset_images(prompts, seed=30_000)
    settings = [(steps, guidance) for steps in (8, 20) for guidance in (1.0, pipe.config.guidance_scale)]
    teachers = {s: generate(pipe, prompts, seeds, s[0], s[1]) for s in settings}
    rows = []
    for plan in args.plan:
        model = copy.deepcopy(pipe)
        blocks = len(pipe.transformer.transformer_blocks) + len(getattr(pipe.transformer, "single_transformer_blocks", []))
        blockprune.compress(model, adapter=ADAPTER[args.model], ratio=len(plan) / blocks, order=plan,
                            calibration=calibration, sandwich=False, seed=args.seed, progress=False, cache_dir=False)
        assert blockprune.plan(model).replaced_names == plan, blockprune.plan(model).replaced_names
        with torch.no_grad():
            row = {"plan": plan, **{k: relative_error(latent_check(model.transformer, held[:8], time_scale,
                                                                   TRAJECTORY_STEPS, g)(), references[k])
                                    for k, g in checks.items()}}
        for steps, guidance in settings:
            images = generate(model, prompts, seeds, steps, guidance)
            row[f"psnr_{steps}_steps_guidance_{guidance:g}"] = image_scores(images, teachers[steps, guidance],
                                                                              prompts, truth)["psnr"]
        rows.append(row)
    if args.output:
        args.output.write_text(json.dumps({"model": args.model, "seed": args.seed, "rows": rows}, indent=1))
    columns = [k for k in rows[0] if k != "plan"]
    print(f"{'plan':<50} " + " ".join(f"{c:>28}" for c in columns))
    for row in rows:
        print(f"{' + '.join(row['plan']):<50} " + " ".join(f"{row[c]:>28.4f}" for c in columns))
    return rows


if __name__ == "__main__":
    main()
