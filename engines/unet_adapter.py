"""`runner.as_unet()`: a TimestepDispatchRunner standing in for `pipe.unet` in diffusers pipelines.

What diffusers pipelines read from their UNet (DDIMPipeline / DDPMPipeline in 0.42:
`unet.config.sample_size`, `unet.config.in_channels`, `unet.dtype`, `unet(x, t).sample`;
StableDiffusionPipeline-style: `unet(latents, t, encoder_hidden_states=...,
timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs=None,
return_dict=False)[0]`, `unet.config.time_cond_proj_dim`; StableDiffusionXLPipeline also
`added_cond_kwargs={"text_embeds", "time_ids"}`, `unet.config.addition_time_embed_dim` and
`unet.add_embedding.linear_1.in_features` (`_get_add_time_ids`' width check)), and what
`DiffusionPipeline` reads from every `torch.nn.Module` component (`.device`, `.dtype`, `.to()`):
this adapter is a parameter-free `torch.nn.Module` that provides all of it. `added_cond_kwargs`
goes to the runner as its flat inputs where the build has them (SDXL layout); other optional
UNet features the graphs do not have (ControlNet residuals, timestep_cond, other added
conditions, attention masks, LoRA scales) are refused with an AdpdmError when a pipeline passes
a value for them, and ignored when it passes None.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import BaseOutput

from engines.conditioning import ADDED_COND_INPUTS
from engines.errors import AdpdmError

# keyword arguments diffusers UNets accept that a quantized build cannot honour (fine when None/empty)
_UNSUPPORTED = (
    "timestep_cond",
    "attention_mask",
    "cross_attention_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "encoder_attention_mask",
)


@dataclass
class RunnerUNetOutput(BaseOutput):
    sample: torch.Tensor


class RunnerUNet(torch.nn.Module):
    """A diffusers-UNet-shaped view of a TimestepDispatchRunner (no parameters, no autograd)."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner
        m = runner.manifest.model
        h, w = m.sample_size
        cfg = dict(m.config)
        cfg.update(
            sample_size=h if h == w else [h, w],
            in_channels=m.in_channels,
            out_channels=m.out_channels,
        )
        if "encoder_hidden_states" in m.conditioning:
            cfg["cross_attention_dim"] = m.conditioning["encoder_hidden_states"]["dim"]
        cfg.setdefault("time_cond_proj_dim", None)
        cfg.setdefault("addition_embed_type", None)
        self._config = FrozenDict(cfg)
        self.added_conds = tuple(n for n in ADDED_COND_INPUTS if n in m.conditioning)
        if self.added_conds:  # what StableDiffusionXLPipeline._get_add_time_ids checks its time ids against
            width = cfg.get("projection_class_embeddings_input_dim")
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    @property
    def config(self) -> FrozenDict:
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @torch.no_grad()
    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        added = kwargs.pop("added_cond_kwargs", None) or {}
        if added and not self.added_conds:
            raise AdpdmError(f"added_cond_kwargs is not supported by this build: its UNet takes no added conditions "
                             f"(got {', '.join(sorted(added))})")
        unknown = sorted(set(added) - set(self.added_conds))
        if unknown:
            raise AdpdmError(f"added_cond_kwargs {unknown} are not supported by a quantized adpdm build (it takes "
                             f"{', '.join(self.added_conds)})")
        for name, value in kwargs.items():
            if name not in _UNSUPPORTED:
                raise AdpdmError(f"RunnerUNet got an unknown argument {name!r}")
            if value is not None and not (isinstance(value, dict) and not value):
                raise AdpdmError(f"{name} is not supported by a quantized adpdm build (the graphs take no such input)")
        in_dtype = sample.dtype
        if in_dtype in (torch.float16, torch.bfloat16, torch.float64):
            sample = sample.float()
        cond = {name: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for name, v in (("encoder_hidden_states", encoder_hidden_states), *added.items()) if v is not None}
        if class_labels is not None:
            cond["class_labels"] = class_labels
        out = self.runner(sample, timestep, **cond).to(device=sample.device, dtype=in_dtype)
        if not return_dict:
            return (out,)
        return RunnerUNetOutput(sample=out)

    def extra_repr(self) -> str:
        return repr(self.runner)
