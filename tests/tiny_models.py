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


def tiny_sdxl_unet(seed: int = 0, cross_attention_dim: int = 24, pooled_dim: int = 16,
                   time_embed_dim: int = 4) -> UNet2DConditionModel:
    """The tiny cross-attention UNet with SDXL's added conditions (addition_embed_type="text_time")."""
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
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
    ).eval()


TEXT_WORDS = ("a", "the", "digit", "handwritten", "zero", "one", "two", "three", "seven", "photo", "of", "cat")


def write_clip_tokenizer(folder, max_length: int = 8, words=TEXT_WORDS) -> dict[str, int]:
    """A CLIP BPE tokenizer saved in `folder`, each word of `words` one token (the reference-text
    trainer's writer); returns its vocabulary."""
    from pathlib import Path

    from tools.train_reference_text import write_word_tokenizer

    return write_word_tokenizer(Path(folder), words, max_length).get_vocab()


def _clip_text_config(vocab: dict[str, int], width: int, max_length: int, layers: int = 1, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=max_length,
                          bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                          pad_token_id=vocab["<|endoftext|>"], **extra)


def _save_vae_and_scheduler(folder, clip_sample: bool, vae_blocks: int = 2) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler

    AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8,) * vae_blocks,
                  down_block_types=("DownEncoderBlock2D",) * vae_blocks, up_block_types=("UpDecoderBlock2D",) * vae_blocks,
                  norm_num_groups=4, sample_size=16 * 2 ** (vae_blocks - 1)).save_pretrained(str(folder / "vae"))
    DDPMScheduler(num_train_timesteps=1000, clip_sample=clip_sample).save_pretrained(str(folder / "scheduler"))


def save_text_pipeline(folder, max_length: int = 8, text_width: int = 24, words=TEXT_WORDS, seed: int = 0,
                       clip_sample: bool = True, vae_blocks: int = 2):
    """A tiny Stable-Diffusion-layout pipeline folder: a CLIP BPE tokenizer written here (each word one
    token), a tiny CLIPTextModel, the tiny cross-attention UNet, a tiny AutoencoderKL (vae_blocks=1:
    no upsampling, 16x16 1-channel images like the digits classifier's), a DDPM scheduler."""
    import json
    from pathlib import Path

    from transformers import CLIPTextModel

    folder = Path(folder)
    vocab = write_clip_tokenizer(folder / "tokenizer", max_length, words)
    torch.manual_seed(seed)
    CLIPTextModel(_clip_text_config(vocab, text_width, max_length)).eval().save_pretrained(str(folder / "text_encoder"))
    tiny_cond_unet(seed).save_pretrained(str(folder / "unet"))
    _save_vae_and_scheduler(folder, clip_sample, vae_blocks)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
    }))
    return folder


def save_sdxl_pipeline(folder, max_length: int = 8, widths: tuple[int, int] = (8, 16), pooled_dim: int = 16,
                       force_zeros_for_empty_prompt: bool = True, words=TEXT_WORDS, seed: int = 0,
                       clip_sample: bool = False):
    """A tiny SDXL-layout pipeline folder: two tokenizers written here, a CLIPTextModel and a
    CLIPTextModelWithProjection (hidden widths `widths`, projection `pooled_dim`), the tiny UNet with
    SDXL's added conditions (cross-attention sum(widths)), the tiny VAE and a DDPM scheduler."""
    import json
    from pathlib import Path

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    vocab = write_clip_tokenizer(folder / "tokenizer", max_length, words)
    write_clip_tokenizer(folder / "tokenizer_2", max_length, words)
    torch.manual_seed(seed)
    CLIPTextModel(_clip_text_config(vocab, widths[0], max_length, layers=2)).eval().save_pretrained(str(folder / "text_encoder"))
    CLIPTextModelWithProjection(_clip_text_config(vocab, widths[1], max_length, layers=2, projection_dim=pooled_dim)).eval() \
        .save_pretrained(str(folder / "text_encoder_2"))
    tiny_sdxl_unet(seed, cross_attention_dim=sum(widths), pooled_dim=pooled_dim).save_pretrained(str(folder / "unet"))
    _save_vae_and_scheduler(folder, clip_sample)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
    }))
    return folder
