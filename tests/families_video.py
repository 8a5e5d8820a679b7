"""Coverage cases: diffusers video transformers, each in a tiny configuration with matching calibration inputs."""

from __future__ import annotations

import diffusers
import torch
from family_cases import Family, batches_of, built, evaluated, randn

TEXT_IMAGE = ("encoder_hidden_states", "hidden_states")
IMAGE_TEXT = ("hidden_states", "encoder_hidden_states")


def video_text_batches(latent: tuple[int, ...], text_dim: int, text: int = 6, batch: int = 2,
                       timestep: float = 1000.0, **extra):
    """Batches of a ``(B, *latent)`` video latent, ``(B, text, text_dim)`` text and a timestep in [0, ``timestep``)."""
    return batches_of(lambda g: {
        "hidden_states": randn(g, batch, *latent),
        "encoder_hidden_states": randn(g, batch, text, text_dim),
        "timestep": torch.rand(batch, generator=g) * timestep,
        **evaluated(extra, g),
    })


WAN_LIKE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32)

COGVIDEOX_LIKE = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                      text_embed_dim=8, num_layers=4, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                      temporal_compression_ratio=4, max_text_seq_length=6)

FAMILIES = [
    Family(
        "wan",
        built(diffusers.WanTransformer3DModel, **WAN_LIKE),
        video_text_batches((4, 2, 8, 8), 16),
        lists={"blocks": 4},
        streams={"WanTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "skyreels_v2",
        built(diffusers.SkyReelsV2Transformer3DModel, **WAN_LIKE),
        video_text_batches((4, 2, 8, 8), 16),
        lists={"blocks": 4},
        streams={"SkyReelsV2TransformerBlock": ("hidden_states",)},
    ),
    Family(
        "chronoedit",
        built(diffusers.ChronoEditTransformer3DModel, **WAN_LIKE),
        video_text_batches((4, 2, 8, 8), 16),
        lists={"blocks": 4},
        streams={"WanTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "ltx",
        built(diffusers.LTXVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
              attention_head_dim=8, cross_attention_dim=16, num_layers=4, caption_channels=16),
        video_text_batches((2 * 4 * 4, 4), 16, encoder_attention_mask=torch.ones(2, 6), num_frames=2, height=4,
                           width=4),
        lists={"transformer_blocks": 4},
        streams={"LTXVideoTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "mochi",
        built(diffusers.MochiTransformer3DModel, patch_size=2, num_attention_heads=2, attention_head_dim=8,
              num_layers=4, pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
              max_sequence_length=16),
        video_text_batches((4, 2, 8, 8), 16, encoder_attention_mask=torch.ones(2, 6)),
        lists={"transformer_blocks": 4},
        streams={"MochiTransformerBlock": IMAGE_TEXT},
        notes="the last block returns the text stream unchanged",
    ),
    Family(
        "cosmos",
        built(diffusers.CosmosTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
              attention_head_dim=12, num_layers=4, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
              max_size=(4, 16, 16), patch_size=(1, 2, 2), concat_padding_mask=False),
        video_text_batches((4, 2, 8, 8), 16),
        lists={"transformer_blocks": 4},
        streams={"CosmosTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "allegro",
        built(diffusers.AllegroTransformer3DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4,
              out_channels=4, num_layers=4, cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8,
              caption_channels=8),
        video_text_batches((4, 2, 8, 8), 8),
        lists={"transformer_blocks": 4},
        streams={"AllegroTransformerBlock": ("hidden_states",)},
    ),
    Family(
        "cogvideox",
        built(diffusers.CogVideoXTransformer3DModel, **COGVIDEOX_LIKE),
        video_text_batches((2, 4, 8, 8), 8),
        lists={"transformer_blocks": 4},
        streams={"CogVideoXBlock": IMAGE_TEXT},
    ),
    Family(
        "latte",
        built(diffusers.LatteTransformer3DModel, sample_size=8, num_layers=3, patch_size=2, attention_head_dim=4,
              num_attention_heads=2, caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8,
              attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
              norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=2),
        video_text_batches((4, 2, 8, 8), 8),
        lists={"transformer_blocks": 3, "temporal_transformer_blocks": 3},
        streams={"BasicTransformerBlock": ("hidden_states",)},
        notes="spatial and temporal lists interleave, with reshapes between them; blocks are ordered as they run",
    ),
    Family(
        "hunyuanvideo",
        built(diffusers.HunyuanVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
              attention_head_dim=10, num_layers=2, num_single_layers=2, num_refiner_layers=2, patch_size=1,
              patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
        video_text_batches((4, 1, 4, 4), 16, encoder_attention_mask=torch.ones(2, 6),
                           pooled_projections=lambda g: randn(g, 2, 8),
                           guidance=torch.full((2,), 3500.0)),
        lists={"context_embedder.token_refiner.refiner_blocks": 2, "transformer_blocks": 2,
               "single_transformer_blocks": 2},
        streams={"HunyuanVideoIndividualTokenRefinerBlock": ("hidden_states",),
                 "HunyuanVideoTransformerBlock": IMAGE_TEXT, "HunyuanVideoSingleTransformerBlock": IMAGE_TEXT},
        notes="the text token refiner's blocks are residual and found too",
    ),
    Family(
        "easyanimate",
        built(diffusers.EasyAnimateTransformer3DModel, num_attention_heads=2, attention_head_dim=16, in_channels=4,
              out_channels=4, time_embed_dim=2, text_embed_dim=16, num_layers=4, sample_width=8, sample_height=8,
              patch_size=2),
        video_text_batches((4, 2, 8, 8), 16),
        lists={"transformer_blocks": 4},
        streams={"EasyAnimateTransformerBlock": IMAGE_TEXT},
    ),
]
