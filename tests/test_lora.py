"""LoRA and compressed models (what docs/faq.md says): loading, fine-tuning, fusing before saving."""

import pytest
import torch
from conftest import flux_batches, make_flux
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import blockprune
from blockprune.errors import BlockpruneError


def compressed_flux():
    model = make_flux()
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(4), order="end2start", sandwich=False,
                        progress=False, cache_dir=False)
    return model


def lora_modules(model):
    return sorted({name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name})


def test_a_lora_made_for_the_original_applies_to_the_kept_blocks_only():
    original = make_flux()
    original.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False), adapter_name="style")
    lora = get_peft_model_state_dict(original, adapter_name="style")
    assert any(key.startswith("single_transformer_blocks.0.") for key in lora)  # has weights for a replaced block
    model = compressed_flux()
    batch = flux_batches(1, seed=1)[0]
    with torch.no_grad():
        before = model(**batch).sample
    model.load_lora_adapter(lora, adapter_name="style", prefix=None)  # diffusers warns about the dropped keys
    assert lora_modules(model) == [f"transformer_blocks.{i}.attn.{p}" for i in (0, 1) for p in ("to_q", "to_v")]
    with torch.no_grad():
        assert not torch.allclose(model(**batch).sample, before)


def test_lora_on_a_compressed_model_must_be_fused_before_saving(tmp_path):
    model = compressed_flux()
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "linears.hidden_states"], init_lora_weights=False))
    assert "single_transformer_blocks.0.linears.hidden_states" in lora_modules(model)  # surrogates can take LoRA too
    with pytest.raises(BlockpruneError, match="LoRA \\(peft\\) layers.*fuse_lora\\(\\) and model.unload_lora\\(\\)"):
        blockprune.save_pretrained(model, tmp_path / "unfused")
    assert not (tmp_path / "unfused").exists()
    batch = flux_batches(1, seed=1)[0]
    with torch.no_grad():
        with_lora = model(**batch).sample
    model.fuse_lora()
    model.unload_lora()
    blockprune.save_pretrained(model, tmp_path / "fused")
    loaded = blockprune.from_pretrained(tmp_path / "fused")
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).sample, with_lora, atol=1e-5)
