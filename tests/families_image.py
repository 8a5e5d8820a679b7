"""Coverage cases: diffusers image transformers, each in a tiny configuration with matching calibration inputs."""

from __future__ import annotations

import diffusers
import torch
from family_cases import Family, batches_of, built, evaluated, randn

TEXT_IMAGE = ("encoder_hidden_states", "hidden_states")


def latent_text_batches(channels: int, side: int, text_dim: int, text: int = 6, batch: int = 2, **extra):
    """Batches of a ``(B, C, side, side)`` latent, ``(B, text, text_dim)`` text and a timestep in [0, 1000)."""
    return batches_of(lambda g: {
        "hidden_states": randn(g, batch, channels, side, side),
        "encoder_hidden_states": randn(g, batch, text, text_dim),
        "timestep": torch.rand(batch, generator=g) * 1000,
        **evaluated(extra, g),
    })


def flux_layout_batches(channels: int, text_dim: int, side: int = 4, text: int = 6, batch: int = 2,
                        id_axes: int = 3, batched_ids: bool = False, **extra):
    """Batches in FLUX's packed layout: ``(B, side², C)`` tokens, text, and position ids for both."""

    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(side * side, id_axes - 2), grid.float()], 1)
    txt_ids = torch.zeros(text, id_axes)
    if id_axes == 4:  # FLUX.2: (t, h, w, l) for the image, l counts text tokens
        img_ids = torch.cat([torch.zeros(side * side, 1), grid.float(), torch.zeros(side * side, 1)], 1)
        txt_ids[:, 3] = torch.arange(text)
    if batched_ids:
        img_ids, txt_ids = img_ids.expand(batch, -1, -1), txt_ids.expand(batch, -1, -1)
    return batches_of(lambda g: {
        "hidden_states": randn(g, batch, side * side, channels),
        "encoder_hidden_states": randn(g, batch, text, text_dim),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        **evaluated(extra, g),
    })


COGVIEW_SIZES = dict(original_size=torch.tensor([[64, 64]] * 2), target_size=torch.tensor([[64, 64]] * 2),
                     crop_coords=torch.tensor([[0, 0]] * 2))

_make_dit = built(diffusers.DiTTransformer2DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                  out_channels=4, num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)


_dit_batches = batches_of(lambda g: {
    "hidden_states": randn(g, 2, 4, 8, 8),
    "timestep": torch.randint(0, 1000, (2,), generator=g),
    "class_labels": torch.randint(0, 10, (2,), generator=g),
})


FAMILIES = [
    Family(
        "pixart",
        built(diffusers.PixArtTransformer2DModel, sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8,
              num_attention_heads=2, in_channels=4, out_channels=8, cross_attention_dim=16, norm_num_groups=4,
              use_additional_conditions=False, caption_channels=16),
        latent_text_batches(4, 8, 16, added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
        lists={"transformer_blocks": 4},
        streams={"BasicTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "sana",
        built(diffusers.SanaTransformer2DModel, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
              attention_head_dim=4, num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
              cross_attention_dim=8, caption_channels=8, sample_size=8),
        latent_text_batches(4, 8, 8),
        lists={"transformer_blocks": 4},
        streams={"SanaTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "qwenimage",
        built(diffusers.QwenImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4, num_layers=4,
              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 2, 2)),
        batches_of(lambda g: {
            "hidden_states": randn(g, 2, 16, 16),
            "encoder_hidden_states": randn(g, 2, 6, 16),
            "encoder_hidden_states_mask": torch.ones(2, 6, dtype=torch.long),
            "timestep": torch.rand(2, generator=g),
            "img_shapes": [(1, 4, 4)] * 2,
        }),
        lists={"transformer_blocks": 4},
        streams={"QwenImageTransformerBlock": TEXT_IMAGE},
    ),
    Family(
        "flux",
        built(diffusers.FluxTransformer2DModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
              axes_dims_rope=(2, 2, 4)),
        flux_layout_batches(4, 16, pooled_projections=lambda g: randn(g, 2, 8)),
        lists={"transformer_blocks": 2, "single_transformer_blocks": 2},
        streams={"FluxTransformerBlock": TEXT_IMAGE, "FluxSingleTransformerBlock": TEXT_IMAGE},
        adapter="flux",
    ),
    Family(
        "flux2",
        built(diffusers.Flux2Transformer2DModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16,
              axes_dims_rope=(2, 2, 2, 2)),
        flux_layout_batches(4, 16, id_axes=4, batched_ids=True, guidance=lambda g: torch.ones(2)),
        lists={"transformer_blocks": 2, "single_transformer_blocks": 2},
        streams={"Flux2TransformerBlock": TEXT_IMAGE, "Flux2SingleTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "chroma",
        built(diffusers.ChromaTransformer2DModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
              approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=2),
        flux_layout_batches(4, 16),
        lists={"transformer_blocks": 2, "single_transformer_blocks": 2},
        streams={"ChromaTransformerBlock": TEXT_IMAGE, "ChromaSingleTransformerBlock": ("hidden_states",)},
        notes="the guidance approximator's `layers` and `norms` lists are skipped: the caller adds their outputs "
              "(`x = x + layer(norm(x))`), so no block feeds the next",
    ),
    Family(
        "bria",
        built(diffusers.BriaTransformer2DModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[0, 4, 4]),
        flux_layout_batches(4, 16),
        lists={"transformer_blocks": 2, "single_transformer_blocks": 2},
        streams={"BriaTransformerBlock": TEXT_IMAGE, "BriaSingleTransformerBlock": TEXT_IMAGE},
    ),
    Family(
        "sd3",
        built(diffusers.SD3Transformer2DModel, sample_size=8, patch_size=2, in_channels=4, num_layers=4,
              attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
              pooled_projection_dim=8, out_channels=4),
        latent_text_batches(4, 8, 16, pooled_projections=lambda g: randn(g, 2, 8)),
        lists={"transformer_blocks": 4},
        streams={"JointTransformerBlock": {TEXT_IMAGE, ("hidden_states",)}},
        adapter="sd3",
    ),
    Family(
        "dit",
        _make_dit,
        _dit_batches,
        lists={"transformer_blocks": 4},
        streams={"BasicTransformerBlock": ("hidden_states",)},
        adapter="dit",
        notes="`transformer_blocks.0` keeps `norm1.emb`, which the output layer calls",
    ),
    Family(
        "dit_generic",
        _make_dit,
        _dit_batches,
        lists={"transformer_blocks": 4},
        streams={"BasicTransformerBlock": ("hidden_states",)},
        notes="the generic adapter sees the output layer call `transformer_blocks.0.norm1.emb` and keeps it too",
    ),
    Family(
        "hunyuandit",
        built(diffusers.HunyuanDiT2DModel, sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8,
              num_attention_heads=2, in_channels=4, cross_attention_dim=16, cross_attention_dim_t5=16,
              pooled_projection_dim=8, hidden_size=16, text_len=6, text_len_t5=5),
        latent_text_batches(4, 8, 16, text_embedding_mask=torch.ones(2, 6),
                            encoder_hidden_states_t5=lambda g: randn(g, 2, 5, 16),
                            text_embedding_mask_t5=torch.ones(2, 5),
                            image_meta_size=torch.tensor([[64, 64, 64, 64, 0, 0]] * 2),
                            style=torch.zeros(2, dtype=torch.long)),
        lists={"blocks": 4},
        streams={"HunyuanDiTBlock": ("hidden_states",)},
        notes="the `skip` input of the second-half blocks has the stream's shape but is context: it comes from an "
              "earlier block, not the previous one",
    ),
    Family(
        "cogview3plus",
        built(diffusers.CogView3PlusTransformer2DModel, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=4,
              num_attention_heads=2, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2,
              pos_embed_max_size=8, sample_size=8),
        latent_text_batches(4, 8, 8, **COGVIEW_SIZES),
        lists={"transformer_blocks": 4},
        streams={"CogView3PlusTransformerBlock": ("hidden_states", "encoder_hidden_states")},
    ),
    Family(
        "cogview4",
        built(diffusers.CogView4Transformer2DModel, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=4,
              num_attention_heads=2, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=4,
              rope_axes_dim=(2, 2)),
        latent_text_batches(4, 8, 8, **COGVIEW_SIZES),
        lists={"transformer_blocks": 4},
        streams={"CogView4TransformerBlock": ("hidden_states", "encoder_hidden_states")},
    ),
    Family(
        "lumina2",
        built(diffusers.Lumina2Transformer2DModel, sample_size=8, patch_size=2, in_channels=4, hidden_size=16,
              num_layers=2, num_refiner_layers=2, num_attention_heads=2, num_kv_heads=1, multiple_of=4,
              axes_dim_rope=(4, 2, 2), axes_lens=(64, 64, 64), cap_feat_dim=8),
        latent_text_batches(4, 8, 8, encoder_attention_mask=torch.ones(2, 6, dtype=torch.bool)),
        lists={"noise_refiner": 2, "context_refiner": 2, "layers": 2},
        streams={"Lumina2TransformerBlock": ("hidden_states",)},
        notes="the caption and noise refiners are residual block lists too",
    ),
    Family(
        "auraflow",
        built(diffusers.AuraFlowTransformer2DModel, sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
              num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
              joint_attention_dim=16, out_channels=4, pos_embed_max_size=64),
        latent_text_batches(4, 8, 16),
        lists={"joint_transformer_blocks": 2, "single_transformer_blocks": 2},
        streams={"AuraFlowJointTransformerBlock": TEXT_IMAGE, "AuraFlowSingleTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "hidream",
        built(diffusers.HiDreamImageTransformer2DModel, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
              num_single_layers=2, attention_head_dim=8, num_attention_heads=2, caption_channels=[8, 4],
              text_emb_dim=8, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
              max_resolution=(32, 32), llama_layers=(0, 1, 0, 1)),
        batches_of(lambda g: {
            "hidden_states": randn(g, 2, 4, 8, 8),
            "timesteps": torch.rand(2, generator=g) * 1000,
            "encoder_hidden_states_t5": randn(g, 2, 6, 8),
            "encoder_hidden_states_llama3": randn(g, 2, 2, 6, 4),
            "pooled_embeds": randn(g, 2, 8),
        }),
        lists={"double_stream_blocks": 2, "single_stream_blocks": 2},
        streams={"HiDreamBlock": {("hidden_states", "encoder_hidden_states"), ("hidden_states",)}},
        notes="each block's text stream is the previous block's text plus fresh Llama tokens; carried rows still "
              "identify it",
    ),
    Family(
        "omnigen",
        built(diffusers.OmniGenTransformer2DModel, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
              intermediate_size=32, num_layers=4, in_channels=4, time_step_dim=4, vocab_size=64, pad_token_id=0,
              rope_scaling={"long_factor": [1.0] * 4, "short_factor": [1.0] * 4}),
        batches_of(lambda g: {
            "hidden_states": randn(g, 2, 4, 8, 8),
            "timestep": torch.rand(2, generator=g),
            "input_ids": None,
            "input_img_latents": [],
            "input_image_sizes": {},
            "attention_mask": torch.ones(2, 17, 17),
            "position_ids": torch.arange(17).expand(2, -1),
        }),
        lists={"layers": 4},
        streams={"OmniGenBlock": ("hidden_states",)},
    ),
]
