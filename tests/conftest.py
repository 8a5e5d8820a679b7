"""Tiny real diffusers transformers (random weights) and calibration inputs for the tests."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["BLOCKPRUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="blockprune-test-cache-")
atexit.register(shutil.rmtree, os.environ["BLOCKPRUNE_CACHE_DIR"], ignore_errors=True)  # left behind by every run before

import pytest
import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from torch import nn

import blockprune
from blockprune import Metric
from blockprune.toy import ToyPipeline, evaluation_prompts, generate

torch.set_num_threads(1)  # tiny models: threads cost more than they give


def make_flux(seed: int = 0, double: int = 2, single: int = 2) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def cast_batch(batch: dict, dtype: torch.dtype) -> dict:
    """``batch`` with its floating tensors in ``dtype`` (the rest as they are)."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def flux_batches(count: int, seed: int = 0, batch: int = 2, side: int = 4, text: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(side * side, 1), ids.float()], 1)
    return [
        {
            "hidden_states": torch.randn(batch, side * side, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, text, 16, generator=g),
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "timestep": torch.rand(batch, generator=g),
            "img_ids": img_ids,
            "txt_ids": torch.zeros(text, 3),
        }
        for _ in range(count)
    ]


def make_sd3(seed: int = 0, layers: int = 4) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
    ).eval()


def sd3_batches(count: int, seed: int = 0, batch: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "timestep": torch.rand(batch, generator=g) * 1000,
        }
        for _ in range(count)
    ]


def make_dit(seed: int = 0, layers: int = 4) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    ).eval()


def dit_batches(count: int, seed: int = 0, batch: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "class_labels": torch.randint(0, 10, (batch,), generator=g),
        }
        for _ in range(count)
    ]


class ResidualMLP(nn.Module):
    """A plain-torch residual block: x + W2 gelu(W1 norm(x)); a scale ``ctx`` passes through untouched."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x) * ctx)))


class TinyResidualNet(nn.Module):
    """A plain-torch model: embedding, a list of residual blocks, a head (not a diffusers class)."""

    def __init__(self, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.layers = nn.ModuleList(ResidualMLP(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, inputs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = self.embed(inputs)
        for layer in self.layers:
            x = layer(x, scale)
        return self.head(x)


class SwapBlock(nn.Module):
    """Takes two same-shaped streams and returns them swapped: shape alone cannot tell them apart."""

    def __init__(self, dim):
        super().__init__()
        self.a, self.b = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, first, second):
        return second + 0.01 * self.b(second), first + 0.01 * self.a(first)


class SwapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(SwapBlock(8) for _ in range(3))

    def forward(self, x, y):
        for block in self.blocks:
            x, y = block(x, y)
        return x + y


def residual_net_batches(count: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"inputs": torch.randn(4, 10, 3, generator=g), "scale": torch.ones(1)} for _ in range(count)]


MODELS = {
    "flux": (make_flux, flux_batches),
    "sd3": (make_sd3, sd3_batches),
    "dit": (make_dit, dit_batches),
}


@pytest.fixture(params=sorted(MODELS))
def family(request):
    """(adapter name, model factory, batch factory) for each built-in family."""
    make, batches = MODELS[request.param]
    return request.param, make, batches


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got - expected) ** 2).sum() / (expected**2).sum())


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str):
    """``benchmarks/{name}.py`` imported as a module (``benchmarks/`` on the path for its own imports)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Counting(Metric):
    """A forward metric that counts its evaluations (the value: the block name's length)."""

    name = "counting"
    higher_is_better = False

    def __init__(self):
        self.calls = 0

    def evaluate(self, context, block, state):
        self.calls += 1
        return float(len(block.name))


class CountingPlugin:
    def __init__(self):
        self.metric = Counting()

    @blockprune.hookimpl
    def blockprune_register_metrics(self, register):
        register(self.metric)


@pytest.fixture
def counting():
    plugin = CountingPlugin()
    blockprune.register_plugin(plugin)
    yield plugin.metric
    blockprune.unregister_plugin(plugin)


TRAINED_STEPS = 8  # sampling steps of the trained-model tests; the ranking of the methods does not need the full 20
TRAINED_PROMPTS = evaluation_prompts(16, seed=1)
TRAINED_SEEDS = list(range(100, 116))


@pytest.fixture(scope="module")
def flux_small():
    """The trained ``flux-small`` toy pipeline and its images of ``TRAINED_PROMPTS`` with ``TRAINED_SEEDS``."""
    pipe = ToyPipeline.from_pretrained("flux-small")
    return pipe, generate(pipe, TRAINED_PROMPTS, TRAINED_SEEDS, TRAINED_STEPS)

