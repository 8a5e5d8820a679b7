"""Coverage cases: diffusers transformers outside text-to-image and text-to-video."""

from __future__ import annotations

import diffusers
import torch
from family_cases import Family, batches_of, built, randn

IMAGE_TEXT = ("hidden_states", "encoder_hidden_states")

_make_ace_step = built(diffusers.AceStepTransformer1DModel, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, in_channels=12,
                       audio_acoustic_hidden_dim=4, patch_size=2, sliding_window=4)
_ace_step_batches = batches_of(lambda g: {
    "hidden_states": randn(g, 2, 8, 4),
    "timestep": torch.rand(2, generator=g),
    "timestep_r": torch.rand(2, generator=g),
    "encoder_hidden_states": randn(g, 2, 6, 16),
    "context_latents": randn(g, 2, 8, 8),
})

FAMILIES = [
    Family(
        "prior",
        built(diffusers.PriorTransformer, num_attention_heads=2, attention_head_dim=4, num_layers=4, embedding_dim=8,
              num_embeddings=7, additional_embeddings=4),
        batches_of(lambda g: {
            "hidden_states": randn(g, 2, 8),
            "timestep": torch.randint(0, 1000, (2,), generator=g),
            "proj_embedding": randn(g, 2, 8),
            "encoder_hidden_states": randn(g, 2, 7, 8),
            "attention_mask": torch.ones(2, 7, dtype=torch.bool),
        }),
        lists={"transformer_blocks": 4},
        streams={"BasicTransformerBlock": ("hidden_states",)},
        notes="the output is `predicted_image_embedding`, not `sample`",
    ),
    Family(
        "transformer_temporal",
        built(diffusers.models.TransformerTemporalModel, num_attention_heads=2, attention_head_dim=8, in_channels=8,
              num_layers=4, norm_num_groups=4),
        batches_of(lambda g: {"hidden_states": randn(g, 4, 8, 4, 4), "num_frames": 2}),
        lists={"transformer_blocks": 4},
        streams={"BasicTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "t5_film",
        built(diffusers.T5FilmDecoder, input_dims=4, targets_length=8, d_model=16, num_layers=4, num_heads=2, d_kv=8,
              d_ff=32, dropout_rate=0.0),
        batches_of(lambda g: {
            "encodings_and_masks": [(randn(g, 2, 6, 16), torch.ones(2, 6, dtype=torch.bool))],
            "decoder_input_tokens": randn(g, 2, 8, 4),
            "decoder_noise_time": torch.rand(2, generator=g),
        }),
        lists={"decoders": 4},
        streams={"DecoderLayer": ("hidden_states",)},
    ),
    Family(
        "dual_transformer_2d",
        built(diffusers.models.DualTransformer2DModel, num_attention_heads=2, attention_head_dim=8, in_channels=16,
              num_layers=2, norm_num_groups=4, cross_attention_dim=16),
        batches_of(lambda g: {
            "hidden_states": randn(g, 2, 16, 4, 4),
            "encoder_hidden_states": randn(g, 2, 77 + 257, 16),  # 77 text and 257 image tokens
            "timestep": torch.randint(0, 1000, (2,), generator=g),
        }),
        lists={},
        streams={},
        failure="found no residual block list in DualTransformer2DModel",
        notes="its only outermost block list, `transformers`, holds two whole Transformer2DModels that return "
              "output objects, not streams; the block lists inside them are not searched (Versatile Diffusion "
              "builds them with one block each anyway)",
    ),
    Family(
        "kandinsky5",
        built(diffusers.Kandinsky5Transformer3DModel, in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
              out_visual_dim=4, patch_size=(1, 2, 2), model_dim=16, ff_dim=32, num_text_blocks=2, num_visual_blocks=2,
              axes_dims=(2, 2, 4)),
        batches_of(lambda g: {
            "hidden_states": randn(g, 1, 1, 8, 8, 4),
            "encoder_hidden_states": randn(g, 1, 6, 16),
            "timestep": torch.rand(1, generator=g) * 1000,
            "pooled_projections": randn(g, 1, 8),
            "visual_rope_pos": [torch.arange(1), torch.arange(4), torch.arange(4)],
            "text_rope_pos": torch.arange(6),
        }),
        lists={"text_transformer_blocks": 2, "visual_transformer_blocks": 2},
        streams={"Kandinsky5TransformerEncoderBlock": ("x",), "Kandinsky5TransformerDecoderBlock": ("visual_embed",)},
        notes="the constructor zero-initialises the blocks' modulation (blocks start as identities); identity "
              "blocks are still recognised as a chain",
    ),
    Family(
        "ace_step",
        _make_ace_step,
        _ace_step_batches,
        lists={"layers": 4},
        streams={"AceStepTransformerBlock": ("hidden_states",)},
        adapter="ace_step",
        notes="`layers.0` keeps `self_attn`, whose processor the forward reads",
    ),
    Family(
        "ace_step_generic",
        _make_ace_step,
        _ace_step_batches,
        lists={"layers": 4},
        streams={"AceStepTransformerBlock": ("hidden_states",)},
        failure="reads 'self_attn' of a replaced AceStepTransformerBlock",
        notes="the forward reads `layers[0].self_attn.processor`, an attribute read that discovery cannot "
              "see, so block 0 cannot be replaced without a declaration: use the `ace_step` adapter",
    ),
    Family(
        "longcat_audio",
        built(diffusers.LongCatAudioDiTTransformer, dit_dim=16, dit_depth=4, dit_heads=2, dit_text_dim=8, latent_dim=4,
              ff_mult=2.0),
        batches_of(lambda g: {
            "hidden_states": randn(g, 2, 8, 4),
            "encoder_hidden_states": randn(g, 2, 6, 8),
            "encoder_attention_mask": torch.ones(2, 6, dtype=torch.bool),
            "timestep": torch.rand(2, generator=g),
        }),
        lists={"blocks": 4},
        streams={"AudioDiTBlock": ("hidden_states",)},
    ),
    Family(
        "stable_audio3",
        built(diffusers.StableAudio3DiTModel, io_channels=4, embed_dim=16, depth=4, num_heads=2, cond_token_dim=8,
              global_cond_dim=8, local_add_cond_dim=4, timestep_features_dim=8, ff_mult=2.0, num_memory_tokens=2),
        batches_of(lambda g: {
            "hidden_states": randn(g, 2, 4, 8),
            "timestep": torch.rand(2, generator=g),
            "encoder_hidden_states": randn(g, 2, 6, 8),
            "global_hidden_states": randn(g, 2, 8),
        }),
        lists={"transformer_blocks": 4},
        streams={"StableAudio3DiTBlock": ("hidden_states",)},
    ),
    Family(
        "minimax_music3",
        built(diffusers.MiniMaxMusic3Transformer1DModel, in_channels=4, condition_dim=8, num_layers=4,
              num_attention_heads=2, attention_head_dim=8, ff_inner_dim=32, rotary_dim=4, fourier_embedding_dim=8),
        batches_of(lambda g: {
            "hidden_states": randn(g, 2, 4, 8),
            "timestep": torch.rand(2, generator=g),
            "encoder_hidden_states": randn(g, 2, 8, 8),
        }),
        lists={"transformer_blocks": 4},
        streams={"MiniMaxMusic3TransformerBlock": ("hidden_states",)},
    ),
    Family(
        "minimax_rvq_decoder",
        built(diffusers.models.MiniMaxMusic3RVQDepthDecoder, hidden_size=16, num_layers=4, num_attention_heads=2,
              intermediate_size=32, audio_vocab_size=8, num_codebooks=4, max_position_embeddings=8),
        batches_of(lambda g: {"inputs_embeds": randn(g, 2, 4, 16)}),
        lists={"layers": 4},
        streams={"MiniMaxMusic3DepthDecoderBlock": ("hidden_states",)},
        notes="the output is a plain tensor, not a diffusers output",
    ),
    Family(
        "dreamlite",
        built(diffusers.models.DreamLiteTransformer2DModel, num_attention_heads=2, attention_head_dim=8,
              in_channels=16, num_layers=4, norm_num_groups=4, cross_attention_dim=16),
        batches_of(lambda g: {"hidden_states": randn(g, 2, 16, 4, 4), "encoder_hidden_states": randn(g, 2, 6, 16)}),
        lists={"transformer_blocks": 4},
        streams={"BasicTransformerBlockDreamLite": ("hidden_states",)},
    ),
]
