"""Prompts to UNet conditioning: a text-to-image pipeline's own tokenizer(s) and text encoder(s).

Stable-Diffusion-layout pipeline folders hold `tokenizer/` (CLIPTokenizer) and `text_encoder/`
(CLIPTextModel) beside `unet/` (`TextEncoder`); SDXL-layout ones also `tokenizer_2/` and
`text_encoder_2/` (CLIPTextModelWithProjection), and their UNet takes two added conditions
(`SdxlTextEncoders`, as diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids
build them). Calibration must see what the UNet sees when serving: the encoders' outputs for
real prompts and, for classifier-free guidance, for the negative prompt (the empty string by
default; zeros where an SDXL pipeline says `force_zeros_for_empty_prompt`), never an all-zero
stand-in the pipeline would not use. Both encoders give `conditions(prompts)` and
`negative_conditions(negative_prompt)`: dicts of the UNet's flat conditioning inputs
(engines/conditioning.py). Weights are read from safetensors only; truncation to the
tokenizer's limit is reported, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from engines.conditioning import SDXL_TIME_IDS
from engines.errors import AdpdmError
from engines.json_files import read_json

DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default
DEFAULT_PROMPTS_FILE = Path(__file__).parent / "assets" / "default_prompts.txt"
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
DEFAULT_VAE_SCALE_FACTOR = 8  # diffusers' pipelines without a VAE config (and every SD/SDXL VAE)


@dataclass
class TextEncoder:
    """One tokenizer and text encoder (a Stable Diffusion pipeline's), in eval mode on the CPU."""

    tokenizer: Any
    model: Any
    folder: Path

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """(K, max_length) token ids, padded and truncated as diffusers does, and the indices of the
        prompts that were longer than the tokenizer's limit."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise AdpdmError("no prompts to encode")
        full = self.tokenizer(prompts, padding="longest", truncation=False).input_ids
        truncated = [i for i, ids in enumerate(full) if len(ids) > self.max_length]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        return tokens.input_ids, truncated

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """(K, max_length, hidden) float32 embeddings of `prompts` (the last hidden state, as
        StableDiffusionPipeline), and the indices of the truncated prompts."""
        ids, truncated = self.tokens(prompts)
        return self.model(ids)[0].to(torch.float32), truncated

    def conditions(self, prompts: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The UNet's conditioning inputs for `prompts` (K rows each), and the truncated prompts."""
        embeds, truncated = self.encode(prompts)
        return {"encoder_hidden_states": embeds}, truncated

    def negative_conditions(self, negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
        """The unconditional half of guidance (one row): the negative prompt's encoding, default ""."""
        return self.conditions(["" if negative_prompt is None else negative_prompt])[0]


@dataclass
class SdxlTextEncoders:
    """An SDXL pipeline's two encoders (CLIPTextModel, CLIPTextModelWithProjection) and added conditions.

    encoder_hidden_states: both encoders' penultimate hidden states, concatenated on the last dim;
    text_embeds: encoder 2's pooled projection; time_ids: (original h, w, crop top, left, target h,
    w) at the pipeline's default size (UNet sample size x the VAE's scale factor), no crop.
    """

    first: TextEncoder
    second: TextEncoder
    time_ids: tuple[float, ...]
    force_zeros_for_empty_prompt: bool
    folder: Path

    @property
    def max_length(self) -> int:
        return self.first.max_length

    @property
    def hidden_size(self) -> int:
        return self.first.hidden_size + self.second.hidden_size

    @property
    def projection_dim(self) -> int:
        return int(self.second.model.config.projection_dim)

    @torch.no_grad()
    def conditions(self, prompts: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        hidden, truncated = [], set()
        pooled = None
        for enc in (self.first, self.second):
            ids, cut = enc.tokens(prompts)
            truncated.update(cut)
            out = enc.model(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise AdpdmError(f"{self.folder}/text_encoder_2 gives no pooled projection (a CLIPTextModelWithProjection "
                             "does)")
        k = len(hidden[0])
        return {
            "encoder_hidden_states": torch.cat(hidden, dim=-1).to(torch.float32),
            "text_embeds": pooled.to(torch.float32),
            "time_ids": torch.tensor([self.time_ids], dtype=torch.float32).expand(k, -1).clone(),
        }, sorted(truncated)

    def negative_conditions(self, negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
        """As diffusers: zero embeddings when no negative prompt is given and the pipeline says
        `force_zeros_for_empty_prompt`, else the negative prompt's encoding (default ""); the time
        ids are the conditional half's."""
        cond = self.conditions(["" if negative_prompt is None else negative_prompt])[0]
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            cond["encoder_hidden_states"].zero_()
            cond["text_embeds"].zero_()
        return cond


def _check_safetensors(folder: Path, what: str) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise AdpdmError(f"{what} {folder} has only pickle weights ({', '.join(pickles)}); this tool never unpickles "
                         "files: convert them to safetensors (save_pretrained(dir, safe_serialization=True))")
    raise AdpdmError(f"{what} {folder} has no .safetensors weights")


def _load_one(tok_dir: Path, enc_dir: Path, cls_name: str) -> TextEncoder:
    _check_safetensors(enc_dir, "text encoder")
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - a dependency
        raise AdpdmError("text-to-image pipelines need `transformers`: pip install transformers") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        raise AdpdmError(f"could not load the tokenizer from {tok_dir}: {str(e).strip()[:200] or type(e).__name__}") from None
    from adpdm_export.model_loading import load_pretrained

    model = load_pretrained(getattr(transformers, cls_name), enc_dir, f"the text encoder ({cls_name})").eval()
    model.requires_grad_(False)
    return TextEncoder(tokenizer=tokenizer, model=model, folder=enc_dir.parent)


def vae_scale_factor(pipeline: Path | None) -> int:
    """2 ** (number of VAE blocks - 1), as diffusers' pipelines compute it; 8 without a VAE config."""
    config = None if pipeline is None else pipeline / "vae" / "config.json"
    if config is None or not config.is_file():
        return DEFAULT_VAE_SCALE_FACTOR
    blocks = read_json(config, "VAE config").get("block_out_channels")
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else DEFAULT_VAE_SCALE_FACTOR


def sdxl_time_ids(pipeline: Path | None, sample_size: tuple[int, int]) -> tuple[float, ...]:
    """StableDiffusionXLPipeline's default time ids: original size = target size = the UNet's
    sample size x the VAE scale factor, crop (0, 0)."""
    f = vae_scale_factor(pipeline)
    h, w = sample_size[0] * f, sample_size[1] * f
    return (float(h), float(w), 0.0, 0.0, float(h), float(w))


def load_text_encoder(pipeline: Path, unet_config: Mapping[str, Any]) -> TextEncoder | SdxlTextEncoders:
    """The tokenizer(s) and text encoder(s) of a pipeline folder, checked against the UNet's config:
    one CLIP encoder (Stable Diffusion), or two and the added conditions where the UNet has
    `addition_embed_type="text_time"` (SDXL)."""
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    dirs = ["tokenizer", "text_encoder"] + (["tokenizer_2", "text_encoder_2"] if sdxl else [])
    missing = [d + "/" for d in dirs if not (pipeline / d).is_dir()]
    if missing:
        layout = "an SDXL pipeline needs tokenizer/, text_encoder/, tokenizer_2/ and text_encoder_2/" if sdxl else \
            "a text-to-image pipeline needs tokenizer/ and text_encoder/"
        raise AdpdmError(f"pipeline folder {pipeline} lacks {' and '.join(missing)} ({layout})")
    width = unet_config.get("cross_attention_dim")
    width = width[0] if isinstance(width, (list, tuple)) else width
    first = _load_one(pipeline / "tokenizer", pipeline / "text_encoder", "CLIPTextModel")
    if not sdxl:
        if first.hidden_size != int(width):
            raise AdpdmError(f"the text encoder in {pipeline / 'text_encoder'} gives {first.hidden_size}-wide embeddings, "
                             f"the UNet's cross-attention takes {width}: they are not one pipeline")
        return first
    from adpdm_export.model_loading import conditioning_of, sample_size_of

    second = _load_one(pipeline / "tokenizer_2", pipeline / "text_encoder_2", "CLIPTextModelWithProjection")
    index = read_json(pipeline / "model_index.json", "pipeline index") if (pipeline / "model_index.json").is_file() else {}
    enc = SdxlTextEncoders(first, second, sdxl_time_ids(pipeline, sample_size_of(unet_config, str(pipeline))),
                           bool(index.get("force_zeros_for_empty_prompt", True)), pipeline)  # diffusers' default: True
    if enc.hidden_size != int(width):
        raise AdpdmError(f"the text encoders in {pipeline} give {first.hidden_size} + {second.hidden_size} = "
                         f"{enc.hidden_size}-wide embeddings, the UNet's cross-attention takes {width}: they are not "
                         "one pipeline")
    pooled = conditioning_of("UNet2DConditionModel", dict(unet_config))["text_embeds"]["dim"]
    if enc.projection_dim != pooled:
        raise AdpdmError(f"text_encoder_2 in {pipeline} projects to {enc.projection_dim}, the UNet's added embedding "
                         f"takes {pooled}-wide text_embeds: they are not one pipeline")
    if first.max_length != second.max_length:
        raise AdpdmError(f"{pipeline}: tokenizer/ pads to {first.max_length} tokens, tokenizer_2/ to {second.max_length}: "
                         "the two encoders' hidden states must have one length")
    return enc


@dataclass
class LatentDecoder:
    """A pipeline's VAE decoder: latents (B, C, h, w) -> images in [-1, 1] (B, 3|1, H, W)."""

    vae: Any

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        scale = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        parts = [self.vae.decode(latents[i:i + batch_size].float() / scale).sample
                 for i in range(0, latents.shape[0], batch_size)]
        return torch.cat(parts).clamp(-1, 1)


def load_latent_decoder(pipeline: Path) -> LatentDecoder | None:
    """The VAE of a pipeline folder (None when it has none: a pixel-space pipeline)."""
    folder = pipeline / "vae"
    if not folder.is_dir():
        return None
    _check_safetensors(folder, "VAE")
    from diffusers import AutoencoderKL

    from adpdm_export.model_loading import load_pretrained

    vae = load_pretrained(AutoencoderKL, folder, "the VAE").eval()
    vae.requires_grad_(False)
    return LatentDecoder(vae)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line (blank lines skipped); an empty or unreadable file is one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdpdmError(f"no such prompt file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdpdmError(f"cannot read the prompt file {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise AdpdmError(f"the prompt file {path} holds no prompts (one prompt a line)")
    return prompts


@dataclass
class PromptConditions:
    """What calibration conditions a text pipeline on: the prompts' conditioning inputs (K rows each,
    cycled over the samples), the negative prompt's (one row: the unconditional half of guidance)
    and the guidance scale."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    guidance_scale: float
    num_prompts: int
    truncated: list[int]


def prompt_conditions(loaded: Any, prompts: Sequence[str] | None = None, negative_prompt: str | None = None,
                      guidance_scale: float | None = None) -> PromptConditions | None:
    """The conditions of a text-to-image pipeline (None for other models when nothing was asked).

    prompts: default `default_prompts()`; negative_prompt: default "" (an SDXL pipeline with
    `force_zeros_for_empty_prompt`: zeros, as diffusers); guidance_scale: default
    DEFAULT_GUIDANCE_SCALE. Asking for prompts or guidance from a model without a text encoder is
    one AdpdmError line.
    """
    from engines.sampler import check_guidance

    if loaded.text_encoder is None:
        asked = [flag for flag, v in (("--prompts", prompts), ("--negative-prompt", negative_prompt),
                                      ("--guidance-scale", guidance_scale)) if v is not None]
        if asked:
            raise AdpdmError(f"{', '.join(asked)} need(s) a text-to-image pipeline folder (tokenizer/ and text_encoder/ "
                             "beside unet/); for a bare conditional UNet give --prompt-embeds")
        return None
    scale = check_guidance(DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale)
    prompts = list(prompts) if prompts is not None else default_prompts()
    cond, truncated = loaded.text_encoder.conditions(prompts)
    return PromptConditions(cond, loaded.text_encoder.negative_conditions(negative_prompt), scale, len(prompts),
                            truncated)


def default_prompts() -> list[str]:
    """The prompt set calibration uses when the user gives none (generic captions)."""
    return read_prompts(DEFAULT_PROMPTS_FILE)
