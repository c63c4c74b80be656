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

import numpy as np
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


MAX_TIME_ID = 65536  # time_ids are pixel sizes and crop offsets: the servers refuse values outside [0, this]


def check_time_ids(v: torch.Tensor) -> None:
    """The servers' bound on SDXL time ids (finite values in [0, MAX_TIME_ID]); one AdpdmError line."""
    if not torch.isfinite(v).all() or bool(((v < 0) | (v > MAX_TIME_ID)).any()):
        raise AdpdmError(f"time_ids are pixel sizes and crop offsets (original h, w, crop top, left, target h, w): "
                         f"each must be in [0, {MAX_TIME_ID}]")


def request_added_conditions(conditioning: Mapping[str, Mapping[str, Any]], given: Mapping[str, Any], n: int,
                             prompted: bool) -> dict[str, torch.Tensor]:
    """A `generate` request's SDXL added conditions for `n` images, checked: `text_embeds` (1 or n, P)
    (from the prompt's encoder when `prompted`: then giving it too is refused) and `time_ids`
    (1 or n, 6), the spec's default when missing. One AdpdmError line per bad input; `adpdm serve`
    and the Triton repository's `generate` model both call this, so both refuse the same requests."""
    out: dict[str, torch.Tensor] = {}
    for name in ADDED_COND_INPUTS:
        if name not in conditioning:
            continue
        v = given[name] if name in given else None  # `given` may be a PyTriton Request: `in` and [] only
        if name == "text_embeds" and prompted:
            if v is not None:
                raise AdpdmError("give prompt or text_embeds, not both (the prompt's second encoder makes text_embeds)")
            continue
        if v is None:
            if name == "time_ids":
                out[name] = default_condition({name: conditioning[name]}, n)[name]
                continue
            raise AdpdmError("missing input 'text_embeds' (an SDXL UNet's pooled prompt embedding; or give a prompt)")
        a = np.asarray(v)
        dim = int(conditioning[name]["dim"])
        if a.dtype.kind != "f":
            raise AdpdmError(f"{name} must be floating point (FP32), got {a.dtype}")
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[0] not in (1, n) or a.shape[1] != dim:
            raise AdpdmError(f"{name} must be (1 or n={n}, {dim}), got shape {tuple(a.shape)}")
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if not torch.isfinite(t).all():
            raise AdpdmError(f"{name} contains NaN or inf")
        if name == "time_ids":
            check_time_ids(t)
        out[name] = t.expand(n, -1).clone() if t.shape[0] == 1 else t
    return out
