"""A text-to-image pipeline's runtime parts: prompt -> UNet conditioning, latents -> images.

Stable-Diffusion-layout pipeline folders hold `tokenizer/` (CLIPTokenizer) and `text_encoder/`
(CLIPTextModel) beside `unet/`, and `vae/` (AutoencoderKL) for latent-space pipelines. The
UNet must see what the pipeline gives it: the encoder's last hidden state for the prompt and, for
classifier-free guidance, for the negative prompt (the empty string by default), never an
all-zero stand-in. Weights are read from safetensors only; a prompt longer than the tokenizer's
limit is truncated and reported, as diffusers does.

This is inference only (torch + transformers + diffusers, no training) and lives in `engines`
because the server (`engines/serving.py`) and the Triton repository's `generate` model run it;
calibration's policy (prompt files, the default prompt set) stays in `adpdm_export/text_prompts.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from engines.errors import AdpdmError
from engines.pretrained import check_safetensors, load_pretrained

DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default
PIPELINE_PARTS = ("model_index.json", "tokenizer", "text_encoder", "vae")  # what prompts -> images need
TEXT_INPUT = "encoder_hidden_states"


@dataclass
class TextEncoder:
    """The pipeline's tokenizer and text encoder, in eval mode on the CPU."""

    tokenizer: Any
    model: Any
    folder: Path

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """(K, max_length, hidden) float32 embeddings of `prompts`, and the indices of the prompts
        that were longer than the tokenizer's limit (truncated, as diffusers does)."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise AdpdmError("no prompts to encode")
        full = self.tokenizer(prompts, padding="longest", truncation=False).input_ids
        truncated = [i for i, ids in enumerate(full) if len(ids) > self.max_length]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        out = self.model(tokens.input_ids)
        return out[0].to(torch.float32), truncated


def _width(cross_attention_dim: Any) -> int:
    return int(cross_attention_dim[0] if isinstance(cross_attention_dim, (list, tuple)) else cross_attention_dim)


def check_text_pipeline_folder(pipeline: Path, cross_attention_dim: Any) -> Optional[dict[str, Any]]:
    """A pipeline folder's text parts, checked without loading any weights: tokenizer/ and
    text_encoder/ present, safetensors only (also in vae/), the encoder's width equal to the UNet's
    cross-attention; returns the VAE's config (None: no vae/, a pixel-space pipeline)."""
    from engines.json_files import read_json

    pipeline = Path(pipeline)
    tok_dir, enc_dir, vae_dir = pipeline / "tokenizer", pipeline / "text_encoder", pipeline / "vae"
    missing = [d.name + "/" for d in (tok_dir, enc_dir) if not d.is_dir()]
    if missing:
        raise AdpdmError(f"pipeline folder {pipeline} lacks {' and '.join(missing)} (a text-to-image pipeline needs "
                         "tokenizer/ and text_encoder/)")
    check_safetensors(enc_dir, "text encoder")
    hidden = read_json(enc_dir / "config.json", "text encoder config").get("hidden_size")
    if hidden is None or int(hidden) != _width(cross_attention_dim):
        raise AdpdmError(f"the text encoder in {enc_dir} gives {hidden}-wide embeddings, the UNet's "
                         f"cross-attention takes {_width(cross_attention_dim)}: they are not one pipeline")
    if not vae_dir.is_dir():
        return None
    check_safetensors(vae_dir, "VAE")
    return read_json(vae_dir / "config.json", "VAE config")


def load_text_encoder(pipeline: Path, cross_attention_dim: Any) -> TextEncoder:
    """The tokenizer and text encoder of a pipeline folder, checked against the UNet's cross-attention width."""
    pipeline = Path(pipeline)
    check_text_pipeline_folder(pipeline, cross_attention_dim)
    tok_dir, enc_dir = pipeline / "tokenizer", pipeline / "text_encoder"
    try:
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError:  # pragma: no cover - a dependency
        raise AdpdmError("text-to-image pipelines need `transformers`: pip install transformers") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        raise AdpdmError(f"could not load the tokenizer from {tok_dir}: {str(e).strip()[:200] or type(e).__name__}") from None
    model = load_pretrained(CLIPTextModel, enc_dir, "the text encoder").eval()
    model.requires_grad_(False)
    return TextEncoder(tokenizer=tokenizer, model=model, folder=pipeline)


def image_shape(vae_config: Mapping[str, Any], latent_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of the images a VAE decodes from (C', h, w) latents: each decoder up block but the
    last doubles the resolution (diffusers' `vae_scale_factor`)."""
    factor = 2 ** (len(vae_config.get("block_out_channels") or (0,)) - 1)
    return int(vae_config.get("out_channels", 3)), int(latent_shape[1]) * factor, int(latent_shape[2]) * factor


@dataclass
class LatentDecoder:
    """A pipeline's VAE decoder: latents (B, C, h, w) -> images in [-1, 1] (B, 3|1, H, W)."""

    vae: Any

    def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        return image_shape(dict(self.vae.config), latent_shape)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        scale = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        parts = [self.vae.decode(latents[i:i + batch_size].float() / scale).sample
                 for i in range(0, latents.shape[0], batch_size)]
        return torch.cat(parts).clamp(-1, 1)


def load_latent_decoder(pipeline: Path) -> Optional[LatentDecoder]:
    """The VAE of a pipeline folder (None when it has none: a pixel-space pipeline)."""
    folder = Path(pipeline) / "vae"
    if not folder.is_dir():
        return None
    check_safetensors(folder, "VAE")  # also in check_text_pipeline_folder; this loader is public on its own
    from diffusers import AutoencoderKL

    vae = load_pretrained(AutoencoderKL, folder, "the VAE").eval()
    vae.requires_grad_(False)
    return LatentDecoder(vae)


# --------------------------------------------------------------------------- a pipeline and its build


@dataclass
class TextPipeline:
    """What generating from a prompt needs besides the UNet: the text encoder and the VAE (None: pixel space)."""

    text_encoder: TextEncoder
    decoder: Optional[LatentDecoder]
    folder: Path

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents if self.decoder is None else self.decoder.decode(latents)

    def image_shape(self, sample_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(sample_shape) if self.decoder is None else self.decoder.image_shape(sample_shape)  # type: ignore


def load_text_pipeline(folder: str | Path, cross_attention_dim: Any) -> TextPipeline:
    """The text encoder and VAE of a pipeline folder, checked against the UNet's cross-attention width."""
    folder = Path(folder)
    if cross_attention_dim is None:
        raise AdpdmError(f"{folder}: the UNet has no cross-attention; prompts apply to text-to-image pipelines")
    return TextPipeline(load_text_encoder(folder, cross_attention_dim), load_latent_decoder(folder), folder)


def is_pipeline_folder(folder: str | Path) -> bool:
    return (Path(folder) / "model_index.json").is_file()


def pipeline_of_build(manifest: Any) -> Path:
    """The pipeline folder a build was made from (its manifest's absolute model source), where
    its text encoder and VAE are; one AdpdmError line where that is not a pipeline folder here."""
    if TEXT_INPUT not in manifest.model.conditioning:
        raise AdpdmError("prompts apply to builds of a text-to-image pipeline; this build's UNet takes "
                         f"{', '.join(manifest.model.conditioning) or 'no conditioning'}")
    folder = Path(manifest.model.source)
    if not (folder.is_absolute() and is_pipeline_folder(folder)):
        raise AdpdmError(f"prompts need the text encoder of the pipeline this build was made from, {folder}, "
                         "which is not a pipeline folder here (moved, or the build is not of a text pipeline)")
    return folder


def copy_text_parts(pipeline: Path, dst: Path) -> None:
    """Copy what prompts -> images need (`PIPELINE_PARTS`, no UNet, no pickle files) into `dst`
    (the Triton repository's generate model carries its own copy; docs/serving.md says why)."""
    import shutil

    from engines.pretrained import PICKLE_SUFFIXES

    dst.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_PARTS:
        src = Path(pipeline) / name
        if src.is_file():
            shutil.copyfile(src, dst / name)
        elif src.is_dir():
            shutil.copytree(src, dst / name, ignore=lambda d, names: [n for n in names if Path(n).suffix in PICKLE_SUFFIXES])


def load_build_pipeline(manifest: Any, folder: str | Path | None = None) -> TextPipeline:
    """The text pipeline of a build: `folder` where given (a moved pipeline), else `pipeline_of_build`."""
    folder = pipeline_of_build(manifest) if folder is None else Path(folder)
    if not is_pipeline_folder(folder):
        raise AdpdmError(f"{folder} is not a text-to-image pipeline folder (no model_index.json)")
    return load_text_pipeline(folder, manifest.model.conditioning.get(TEXT_INPUT, {}).get("dim"))


# --------------------------------------------------------------------------- a prompt request


@dataclass(frozen=True)
class PromptRequest:
    """A prompt, its negative prompt (the unconditional half; "" by default) and the guidance scale."""

    prompt: str
    negative_prompt: str = ""
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE

    def __post_init__(self) -> None:
        from engines.sampler import check_guidance

        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise AdpdmError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if not self.prompt.strip():
            raise AdpdmError("the prompt is empty: give the text to generate from")
        object.__setattr__(self, "guidance_scale", check_guidance(self.guidance_scale))


def _one_string(name: str, value: Any) -> str:
    v = np.asarray(value).reshape(-1)
    if v.size != 1:
        raise AdpdmError(f"{name} must hold one string, got {v.size}")
    s = v[0]
    if isinstance(s, (bytes, np.bytes_)):
        try:
            return bytes(s).decode("utf-8")
        except UnicodeDecodeError:
            raise AdpdmError(f"{name} is not valid UTF-8 text") from None
    if isinstance(s, str):
        return s
    raise AdpdmError(f"{name} must be a string (BYTES), got {type(s).__name__}")


def prompt_request(inputs: Mapping[str, Any]) -> Optional[PromptRequest]:
    """The prompt part of a `generate` request (inputs `prompt`, `negative_prompt`, `guidance_scale`,
    as arrays of one element), checked; None when it has no prompt. Shared by `adpdm serve` and the
    Triton repository's `generate` model, so both refuse the same requests with the same line."""
    given = {k: inputs[k] for k in ("prompt", "negative_prompt", "guidance_scale") if k in inputs and inputs[k] is not None}
    if "prompt" not in given:
        if given:
            raise AdpdmError(f"{' and '.join(sorted(given))} go(es) with a prompt")
        return None
    guidance = DEFAULT_GUIDANCE_SCALE
    if "guidance_scale" in given:
        g = np.asarray(given["guidance_scale"]).reshape(-1)
        if g.size != 1 or g.dtype.kind != "f":
            raise AdpdmError(f"guidance_scale must hold one floating-point number, got {g.size} {g.dtype} value(s)")
        guidance = float(g[0])
    negative = _one_string("negative_prompt", given["negative_prompt"]) if "negative_prompt" in given else ""
    return PromptRequest(_one_string("prompt", given["prompt"]), negative, guidance)


@dataclass
class GuidedConditions:
    """What the sampling loop takes for a prompt: the conditional and unconditional inputs (None
    without guidance), the guidance scale, and a note per input that was truncated."""

    cond: dict[str, torch.Tensor]
    uncond: Optional[dict[str, torch.Tensor]]
    guidance_scale: float
    notes: list[str]


def guided_conditions(text_encoder: TextEncoder, request: PromptRequest, n: int,
                      base: Optional[Mapping[str, torch.Tensor]] = None) -> GuidedConditions:
    """The prompt's embeddings for `n` images (and the negative prompt's, with guidance > 1), over
    `base` (the model's other conditions, per item); `adpdm sample --prompt` and the servers call this."""
    base = dict(base or {})
    embeds, truncated = text_encoder.encode([request.prompt])
    notes = [f"the prompt is longer than the tokenizer's {text_encoder.max_length} tokens and was truncated"
             ] if truncated else []
    cond = {**base, TEXT_INPUT: embeds.expand(n, -1, -1)}
    uncond = None
    if request.guidance_scale > 1.0:
        negative, truncated = text_encoder.encode([request.negative_prompt])
        if truncated:
            notes.append(f"the negative prompt is longer than the tokenizer's {text_encoder.max_length} tokens "
                         "and was truncated")
        uncond = {**base, TEXT_INPUT: negative.expand(n, -1, -1)}
    return GuidedConditions(cond, uncond, request.guidance_scale, notes)
