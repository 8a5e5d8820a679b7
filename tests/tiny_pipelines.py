"""Tiny real diffusers pipelines (random weights): FLUX with real CLIP and T5 tokenizers built offline from an
in-memory vocabulary, tiny text encoders and a tiny VAE."""

from __future__ import annotations

import torch
from conftest import make_flux
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

WORDS = ["a", "red", "fox", "blue", "car", "cat", "photo", "of", "the", "green", "tree"]
TEXT_LENGTH = 8  # max_sequence_length the tests call the pipeline with


def clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def t5_tokenizer() -> T5TokenizerFast:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{word}", -1.0) for word in WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TEXT_LENGTH)


def tiny_vae(latent_channels: int = 1) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=latent_channels,
                         norm_num_groups=4, sample_size=8, shift_factor=0.0, scaling_factor=1.0).eval()


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX with 2 double and 2 single blocks; images of 8 × 8 pixels by default (``height=8, width=8``)."""
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, projection_dim=8,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                 num_heads=2, relative_attention_num_buckets=8)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=clip,
                        tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer(),
                        transformer=make_flux(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_images(pipe: FluxPipeline, prompt: str = "a red fox", seed: int = 0, **kwargs) -> torch.Tensor:
    """One 8 × 8 image, 2 steps, seeded: the same pipeline gives the same tensor."""
    output = pipe(prompt, height=8, width=8, num_inference_steps=2, max_sequence_length=TEXT_LENGTH,
                  guidance_scale=3.5, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs)
    return output.images


def recorded_calibration(pipe, prompts: list[str]) -> list[dict]:
    """The transformer's forward keyword arguments at every step of :func:`flux_images` on ``prompts``."""
    batches = []

    def record(module, args, kwargs):
        batches.append({k: v for k, v in kwargs.items() if k not in ("return_dict", "joint_attention_kwargs")})

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for seed, prompt in enumerate(prompts):
            flux_images(pipe, prompt, seed)
    finally:
        handle.remove()
    return batches


def compressed_flux_pipeline(ratio: float = 0.5) -> FluxPipeline:
    """:func:`tiny_flux_pipeline` with ``ratio`` of its blocks replaced (least squares, no sandwich training)."""
    import blockprune

    pipe = tiny_flux_pipeline()
    calibration = recorded_calibration(pipe, ["a red fox", "the green tree", "a blue car"])
    blockprune.compress(pipe, adapter="flux", ratio=ratio, calibration=calibration, sandwich=False, progress=False,
                        order="start2end", cache_dir=False)
    return pipe
