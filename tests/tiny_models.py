"""Tiny random diffusers UNets (seeded) for fast export and runtime tests."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel


def tiny_unet2d(seed: int = 0, num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=8,
    ).eval()


def save_unet_folder(unet, folder, scheduler: bool = True):
    """A diffusers UNet folder (config.json + safetensors), with a DDPM scheduler config beside it."""
    from diffusers import DDPMScheduler

    unet.save_pretrained(folder, safe_serialization=True)
    if scheduler:
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    return folder


TEXT_WORDS = ("a", "the", "digit", "handwritten", "zero", "one", "two", "three", "seven", "photo", "of", "cat")


def save_text_pipeline(folder, max_length: int = 8, text_width: int = 24, words=TEXT_WORDS, seed: int = 0,
                       vae_blocks: int = 2):
    """A tiny Stable-Diffusion-layout pipeline folder: a CLIP BPE tokenizer written here (each word one
    token), a tiny CLIPTextModel, the tiny cross-attention UNet, a tiny AutoencoderKL (vae_blocks=1:
    no upsampling, 16x16 1-channel images like the digits classifier's), a DDPM scheduler."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from tools.train_reference_text import write_word_tokenizer

    folder = Path(folder)
    vocab = write_word_tokenizer(folder / "tokenizer", words, max_length).get_vocab()
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=text_width, intermediate_size=2 * text_width,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=max_length,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(config).eval().save_pretrained(str(folder / "text_encoder"))
    tiny_cond_unet(seed).save_pretrained(str(folder / "unet"))
    AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8,) * vae_blocks,
                  down_block_types=("DownEncoderBlock2D",) * vae_blocks, up_block_types=("UpDecoderBlock2D",) * vae_blocks,
                  norm_num_groups=4, sample_size=16 * 2 ** (vae_blocks - 1)).save_pretrained(str(folder / "vae"))
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
    }))
    return folder
