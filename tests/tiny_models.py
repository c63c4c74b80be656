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
