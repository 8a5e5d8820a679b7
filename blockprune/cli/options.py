"""Command-line arguments shared by compress, inspect and importance, and what they turn into."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..calibration import read_prompts
from ..calibration_file import load_calibration
from ..config import defaults, option_names
from ..errors import BlockpruneError
from ..toy.small_models import SMALL_MODELS
from .sources import (
    DTYPES,
    ModelSource,
    check_adapter_name,
    is_pipeline,
    model_source,
)

CALIBRATION_BATCHES = 16  # batches a small model's calibration builder makes by default


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, its adapter, dtype and device."""
    parser.add_argument(
        "model",
        help=f"a folder written by save_pretrained (a diffusers pipeline or transformer, or a blockprune model), or "
        f"the name of a small model: {', '.join(sorted(SMALL_MODELS))}",
    )
    parser.add_argument("--adapter", default="auto", help="adapter name (default: auto, chosen by the model's class)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="load the model in this dtype (default: as saved)")
    parser.add_argument("--device", help="the device to work on, e.g. cuda: the model (a whole pipeline) is moved there")


def add_offload_argument(parser: argparse.ArgumentParser) -> None:
    """``--offload``: the transformer's blocks stay on the CPU and visit ``--device`` one at a time."""
    parser.add_argument("--offload", action="store_true", default=None,
                        help="keep the transformer on the CPU, moving each block to --device only while it runs or "
                        "trains (a pipeline's other components go to --device)")
    parser.add_argument("--max-gpu-memory", metavar="SIZE",
                        help="with --offload: the GPU memory the run may hold, e.g. 20GiB; blocks that fit are copied "
                        "ahead while others run (default: one block ahead)")


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """Where calibration inputs come from."""
    group = parser.add_argument_group(
        "calibration",
        "a pipeline is run on prompts (--prompts, default: the bundled ones); a small model uses its own "
        "calibration builder; a bare transformer folder needs --calibration",
    )
    group.add_argument("--prompts", metavar="FILE", help="prompts to record calibration from a pipeline, one a line")
    group.add_argument("--calibration", metavar="FILE",
                       help="calibration batches in a safetensors file written by 'blockprune calibrate' or "
                       "blockprune.save_calibration (cast to --dtype)")
    group.add_argument("--calibration-batches", type=int, default=CALIBRATION_BATCHES, metavar="N",
                       help=f"batches a small model's calibration builder makes (default {CALIBRATION_BATCHES})")
    group.add_argument("--calibration-steps", type=int, metavar="N",
                       help=f"denoising steps per prompt when recording (default {defaults()['calibration_steps']})")
    group.add_argument("--steps-per-prompt", type=int, metavar="N",
                       help=f"transformer calls kept per prompt (default {defaults()['steps_per_prompt']})")
    group.add_argument("--height", type=int, metavar="PX",
                       help="image height when recording from a pipeline (default: the pipeline's)")
    group.add_argument("--width", type=int, metavar="PX",
                       help="image width when recording from a pipeline (default: the pipeline's)")
    group.add_argument("--seed", type=int, default=0, help="seed of the calibration builder and of compress (default 0)")


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """Importance metrics and their options."""
    group = parser.add_argument_group("importance scoring")
    group.add_argument("--importance", default=None, metavar="METRICS",
                       help="a metric, several comma-separated (equal weights) or name=weight pairs, e.g. "
                       "fid=0.5,clip=0.5, or for compress 'auto' (its default: candidate plans checked on held-out "
                       "calibration; importance's default is fit_residual); see 'blockprune plugins' for the metrics")
    group.add_argument("--ablation", choices=("remove", "replace"),
                       help=f"how a block is ablated for scoring (default {defaults()['ablation']})")
    group.add_argument("--score-batches", type=int, metavar="N", help="calibration batches used for scoring, the first N (default 32)")
    group.add_argument("--ridge", type=float, help=f"ridge term of the least-squares fit (default {defaults()['ridge']})")
    group.add_argument("--cache-dir", metavar="DIR",
                       help="importance score cache (default $BLOCKPRUNE_CACHE_DIR or ~/.cache/blockprune)")
    group.add_argument("--no-cache", action="store_true", help="do not read or write the score cache")
    group.add_argument("--clip-model-path", metavar="DIR", help="local CLIP folder for the clip metric")
    group.add_argument("--generation-steps", type=int, metavar="N", help="denoising steps of generation metrics")
    group.add_argument("--generation-seeds", type=int, nargs="+", metavar="SEED", help="seeds of generation metrics")
    group.add_argument("--generation-batch-size", type=int, metavar="N", help="images per pipeline call (default 1)")


def parse_importance(text: str) -> str | list[str] | dict[str, float]:
    """``name``, ``a,b`` (equal weights) or ``a=0.5,b=0.5`` as ``compress(importance=...)`` takes them."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise BlockpruneError("--importance names no metric; pass e.g. --importance output_mse")
    if not any("=" in p for p in parts):
        return parts[0] if len(parts) == 1 else parts
    weights = {}
    for part in parts:
        name, _, weight = part.partition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise BlockpruneError(f"--importance {text!r}: give every metric a weight (name=number) or none") from None
    return weights


def option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of ``compress`` given on the command line (each argument's dest is the option's name;
    options not given keep their defaults)."""
    options = {name: getattr(args, name) for name in option_names() if getattr(args, name, None) is not None}
    if getattr(args, "no_cache", False):
        options["cache_dir"] = False
    metric_options = {
        key: value
        for key, value in (("clip_model_path", args.clip_model_path), ("generation_steps", args.generation_steps),
                           ("generation_seeds", args.generation_seeds),
                           ("generation_batch_size", args.generation_batch_size))
        if value is not None
    }
    if metric_options:
        options["metric_options"] = metric_options
    recording = call_options(args)
    if recording:
        options["calibration_call_options"] = recording
    return options


def call_options(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call's arguments for recording calibration (``--height``, ``--width``) that were given."""
    return {key: getattr(args, key) for key in ("height", "width") if getattr(args, key, None) is not None}


@dataclass
class Loaded:
    """A model loaded from the command line with its calibration: batches, or prompts to record them from."""

    source: ModelSource
    model: Any
    batches: list[dict[str, Any]] | None
    prompts: list[str] | None

    def calibration_options(self) -> dict[str, Any]:
        """``calibration_prompts`` for compress/importance when calibration is recorded from the pipeline."""
        return {} if self.prompts is None else {"calibration_prompts": self.prompts}

    def check_calibration(self) -> None:
        """A bare transformer without calibration batches is an error: nothing can record them."""
        if self.batches is None and not is_pipeline(self.model):
            raise BlockpruneError(
                f"{self.source.text} is a bare {type(self.model).__name__}, which cannot record its own calibration; "
                f"pass --calibration FILE (recorded from its pipeline with 'blockprune calibrate PIPELINE -o FILE'), "
                f"or a pipeline folder"
            )


def load_model(args: argparse.Namespace, count: int | None = None) -> Loaded:
    """Check the arguments (cheap checks first), then load the model and choose its calibration.

    Calibration: ``--calibration`` batches; else a pipeline records from ``--prompts`` (``None`` here: the
    bundled ones); else a small model's builder makes ``count`` batches (default ``--calibration-batches``);
    else there is none, which :meth:`Loaded.check_calibration` refuses.
    """
    check_adapter_name(args.adapter)
    prompts = read_prompts(args.prompts) if args.prompts else None
    batches = load_calibration(args.calibration, DTYPES.get(args.dtype)) if args.calibration else None
    source = model_source(args.model)
    model = source.load(DTYPES.get(args.dtype))
    if args.device is not None:
        place(model, args.device, offload=bool(getattr(args, "offload", False)))
    if prompts is not None and not is_pipeline(model):
        raise BlockpruneError(f"--prompts needs a pipeline, but {args.model} is a bare {type(model).__name__}; "
                              f"pass --calibration FILE instead")
    if batches is None and prompts is None and source.small is not None:
        batches = source.small.calibration(model, count or args.calibration_batches, args.seed)
    return Loaded(source, model, batches, prompts)


def load_for_run(args: argparse.Namespace) -> tuple[Loaded, dict[str, Any]]:
    """For compress and importance: the loaded model, which must have calibration, and the options to pass
    (those given on the command line, and the prompts to record calibration from)."""
    loaded = load_model(args)
    loaded.check_calibration()
    return loaded, {**option_values(args), **loaded.calibration_options()}


def place(model: Any, device: str, offload: bool) -> None:
    """Move the model to ``device``. With ``offload`` the transformer stays on the CPU (compress moves its blocks
    there one at a time) and only a pipeline's other components move."""
    if not offload:
        model.to(device)
    elif is_pipeline(model):
        for name, component in model.components.items():
            if isinstance(component, nn.Module) and name != "transformer":
                component.to(device)


def auto_or(convert: type, what: str) -> Any:
    """An argparse type taking ``auto`` or what ``convert`` reads (``--sandwich-lr``, ``--heal-steps``)."""
    def parse(text: str) -> Any:
        if text == "auto":
            return text
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or auto, got {text!r}") from None
    return parse
