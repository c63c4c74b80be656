"""Conditioning inputs: their names, their defaults from a conditioning spec (as in the manifest),
and how the flat graph inputs map onto a diffusers UNet's keyword arguments.

Every graph, runner, trajectory and build names each conditioning tensor on its own:
`encoder_hidden_states` (B, S, D), `class_labels` (B,) and, for SDXL-layout UNets
(`addition_embed_type="text_time"`), `text_embeds` (B, P) and `time_ids` (B, 6). diffusers takes
the last two nested, as `added_cond_kwargs={"text_embeds": ..., "time_ids": ...}`;
`accept_added_cond_inputs` lets a UNet take them flat, so every caller passes one dict of tensors.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from engines.errors import AdpdmError

# the keys of diffusers' `added_cond_kwargs` for addition_embed_type="text_time" (SDXL), as flat inputs
ADDED_COND_INPUTS = ("text_embeds", "time_ids")
SDXL_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w): StableDiffusionXLPipeline._get_add_time_ids


def default_condition(conditioning: Mapping[str, Mapping[str, Any]], batch: int) -> dict[str, torch.Tensor]:
    """Conditioning inputs for `batch` items when the user gives none.

    Cross-attention models get a null (all-zero) embedding, one token or the fixed sequence
    length the build declares (a text pipeline's loader gives the empty prompt's encoding
    instead: `LoadedModel.default_condition`); class-conditional models get labels 0, 1, 2, ...
    cycling over the classes; SDXL-layout models a zero pooled embedding (what diffusers gives
    the unconditional half with `force_zeros_for_empty_prompt`) and the time ids the spec
    records as its default (the pipeline's own size, no crop), else zeros.
    """
    cond: dict[str, torch.Tensor] = {}
    if "encoder_hidden_states" in conditioning:
        spec = conditioning["encoder_hidden_states"]
        cond["encoder_hidden_states"] = torch.zeros(batch, int(spec.get("sequence_length") or 1), int(spec["dim"]))
    if "class_labels" in conditioning:
        n = int(conditioning["class_labels"]["num_classes"])
        cond["class_labels"] = torch.arange(batch, dtype=torch.int64) % n
    if "text_embeds" in conditioning:
        cond["text_embeds"] = torch.zeros(batch, int(conditioning["text_embeds"]["dim"]))
    if "time_ids" in conditioning:
        spec = conditioning["time_ids"]
        row = torch.tensor([float(v) for v in spec.get("default") or [0] * int(spec["dim"])])
        cond["time_ids"] = row.expand(batch, -1).clone()
    return cond


def _flat_added_conds(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: `text_embeds=` / `time_ids=` keywords into diffusers' `added_cond_kwargs`."""
    if not any(k in kwargs for k in ADDED_COND_INPUTS):
        return None
    kwargs = dict(kwargs)
    added = dict(kwargs.get("added_cond_kwargs") or {})
    for k in ADDED_COND_INPUTS:
        if k in kwargs:
            if k in added:
                raise AdpdmError(f"{k} given twice (as a keyword and in added_cond_kwargs)")
            added[k] = kwargs.pop(k)
    kwargs["added_cond_kwargs"] = added
    return args, kwargs


def accept_added_cond_inputs(unet: torch.nn.Module) -> torch.nn.Module:
    """Let an SDXL-layout diffusers UNet take `text_embeds` and `time_ids` as keywords of their own
    (a forward pre-hook; idempotent; other models are returned untouched). Returns `unet`."""
    config = getattr(unet, "config", None)
    if getattr(config, "addition_embed_type", None) != "text_time" or getattr(unet, "_adpdm_flat_added_conds", False):
        return unet
    unet.register_forward_pre_hook(_flat_added_conds, with_kwargs=True)
    unet._adpdm_flat_added_conds = True
    return unet
