"""The PixArt plugin, installed: found by entry point, compresses a tiny PixArt, round-trips exactly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from importlib.metadata import entry_points  # noqa: E402

import torch  # noqa: E402
from blockprune_pixart import PixArtAdapter  # noqa: E402
from diffusers import PixArtTransformer2DModel  # noqa: E402

import blockprune  # noqa: E402
from blockprune import plugins
from blockprune.cli import main

CAPTION_TOKENS = 6


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    """4 blocks, width 24 (divisible by 3 for the resolution and aspect-ratio embeddings), caption width 12."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=4,
        cross_attention_dim=24, sample_size=8, patch_size=2, caption_channels=12, use_additional_conditions=True,
    ).eval()


def pixart_batches(count: int, seed: int = 0, batch: int = 2) -> list[dict]:
    """What a PixArt-Σ pipeline passes its transformer: latents, caption states and mask, timestep, sizes."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, CAPTION_TOKENS, 12, generator=g),
            "encoder_attention_mask": torch.ones(batch, CAPTION_TOKENS),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "added_cond_kwargs": {"resolution": torch.tensor([[64.0, 64.0]] * batch),
                                  "aspect_ratio": torch.tensor([[1.0]] * batch)},
        }
        for _ in range(count)
    ]


def test_installed_entry_point_registers_the_adapter():
    names = {ep.name: ep.value for ep in entry_points(group="blockprune")}
    assert names.get("pixart") == "blockprune_pixart"
    assert isinstance(plugins.adapters()["pixart"], PixArtAdapter)
    assert plugins.plugin_contents()["pixart"] == {"adapters": ["pixart"], "metrics": [], "surrogates": []}


def test_auto_picks_the_plugin_and_finds_four_single_stream_blocks():
    model = tiny_pixart()
    assert plugins.get_adapter(model).name == "pixart"
    blocks = blockprune.inspect(model, "auto", pixart_batches(1)[0])
    assert [b.name for b in blocks] == [f"transformer_blocks.{i}" for i in range(4)]
    assert all(b.streams == {"hidden_states": (2, 16, 24)} for b in blocks)  # 4×4 patches of 2×2, width 24


def test_compress_quarter_and_round_trip_exactly(tmp_path):
    model = tiny_pixart()
    held_out = pixart_batches(2, seed=1)
    with torch.no_grad():
        reference = [model(**b).sample for b in held_out]
    blockprune.compress(model, ratio=0.25, calibration=pixart_batches(8), sandwich=False, progress=False, cache_dir=False)
    plan = blockprune.plan(model)
    assert plan.adapter == "pixart" and len(plan.replaced) == 1
    assert isinstance(model.get_submodule(plan.replaced[0].name), blockprune.LinearSurrogate)
    assert plan.params_after < plan.params_before and plan.flops_after < plan.flops_before
    with torch.no_grad():
        outputs = [model(**b).sample for b in held_out]
    error = sum(float(((o - r) ** 2).sum()) for o, r in zip(outputs, reference)) / sum(float((r**2).sum()) for r in reference)
    assert 0 < error < 0.05

    blockprune.save_pretrained(model, tmp_path / "pixart")
    loaded = blockprune.from_pretrained(tmp_path / "pixart")
    assert type(loaded) is PixArtTransformer2DModel
    assert blockprune.plan(loaded).replaced_names == plan.replaced_names
    with torch.no_grad():
        for batch, expected in zip(held_out, outputs):
            assert torch.equal(loaded(**batch).sample, expected)


def test_sandwich_training_puts_lora_on_the_attention_and_feed_forward_projections():
    model = tiny_pixart()
    lora = PixArtAdapter().lora_targets(model.transformer_blocks[0])
    assert {"attn1.to_q", "attn2.to_k", "ff.net.2"} <= set(lora) and not any("norm" in name for name in lora)
    blockprune.compress(model, ratio=0.25, calibration=pixart_batches(8), sandwich_steps=3, sandwich_lr=1e-3,
                        progress=False, cache_dir=False)
    stage = blockprune.plan(model).stages[0]
    assert stage.lora_blocks and stage.steps == 3
    assert not any("lora" in name for name, _ in model.named_modules())  # merged after the stage


def test_adjacent_replaced_blocks_fuse(tmp_path):
    model = tiny_pixart()
    blockprune.compress(model, ratio=0.5, calibration=pixart_batches(8), order="end2start", sandwich=False,
                        progress=False, cache_dir=False)
    batch = pixart_batches(1, seed=2)[0]
    with torch.no_grad():
        unfused = model(**batch).sample
    blockprune.save_pretrained(model, tmp_path / "fused", fuse=True)
    loaded = blockprune.from_pretrained(tmp_path / "fused")
    assert [run.blocks for run in blockprune.plan(loaded).fused] == [["transformer_blocks.2", "transformer_blocks.3"]]
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).sample, unfused, atol=1e-5)


def test_blockprune_plugins_lists_the_installed_plugin(capsys):
    assert main(["plugins"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("pixart")]
    assert len(rows) == 1 and "blockprune-pixart 0.1.0" in rows[0] and rows[0].split()[-3:] == ["pixart", "-", "-"]
