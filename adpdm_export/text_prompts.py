"""Prompts to UNet conditioning: a text-to-image pipeline's own tokenizer and text encoder.

Stable-Diffusion-layout pipeline folders hold `tokenizer/` (CLIPTokenizer) and `text_encoder/`
(CLIPTextModel) beside `unet/`. Calibration must see what the UNet sees when serving: the
encoder's last hidden state for real prompts and, for classifier-free guidance, for the
negative prompt (the empty string by default), never an all-zero stand-in. Weights are read
from safetensors only; truncation to the tokenizer's limit is reported, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from engines.errors import AdpdmError

DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default
DEFAULT_PROMPTS_FILE = Path(__file__).parent / "assets" / "default_prompts.txt"
# A pipeline folder's own defaults for this tool (optional): {"guidance_scale": float, "prompts": "file.txt"}.
MODEL_SETTINGS_FILE = "adpdm.json"
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


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


def _check_safetensors(folder: Path, what: str) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise AdpdmError(f"{what} {folder} has only pickle weights ({', '.join(pickles)}); this tool never unpickles "
                         "files: convert them to safetensors (save_pretrained(dir, safe_serialization=True))")
    raise AdpdmError(f"{what} {folder} has no .safetensors weights")


def load_text_encoder(pipeline: Path, cross_attention_dim: Any) -> TextEncoder:
    """The tokenizer and text encoder of a pipeline folder, checked against the UNet's cross-attention width."""
    tok_dir, enc_dir = pipeline / "tokenizer", pipeline / "text_encoder"
    missing = [d.name + "/" for d in (tok_dir, enc_dir) if not d.is_dir()]
    if missing:
        raise AdpdmError(f"pipeline folder {pipeline} lacks {' and '.join(missing)} (a text-to-image pipeline needs "
                         "tokenizer/ and text_encoder/)")
    _check_safetensors(enc_dir, "text encoder")
    try:
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError:  # pragma: no cover - a dependency
        raise AdpdmError("text-to-image pipelines need `transformers`: pip install transformers") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        raise AdpdmError(f"could not load the tokenizer from {tok_dir}: {str(e).strip()[:200] or type(e).__name__}") from None
    from adpdm_export.model_loading import load_pretrained

    model = load_pretrained(CLIPTextModel, enc_dir, "the text encoder").eval()
    model.requires_grad_(False)
    width = cross_attention_dim[0] if isinstance(cross_attention_dim, (list, tuple)) else cross_attention_dim
    if int(model.config.hidden_size) != int(width):
        raise AdpdmError(f"the text encoder in {enc_dir} gives {model.config.hidden_size}-wide embeddings, the UNet's "
                         f"cross-attention takes {width}: they are not one pipeline")
    return TextEncoder(tokenizer=tokenizer, model=model, folder=pipeline)


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
    """What calibration conditions a text pipeline on: the prompts' embeddings (cycled over the
    samples), the negative prompt's (the unconditional half of guidance) and the guidance scale."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    guidance_scale: float
    num_prompts: int
    truncated: list[int]


def prompt_conditions(loaded: Any, prompts: Sequence[str] | None = None, negative_prompt: str | None = None,
                      guidance_scale: float | None = None) -> PromptConditions | None:
    """The conditions of a text-to-image pipeline (None for other models when nothing was asked).

    prompts: default `default_prompts(folder)`; negative_prompt: default "" (never zeros);
    guidance_scale: default `default_guidance_scale(folder)`. Asking for prompts or guidance from a model
    without a text encoder is one AdpdmError line.
    """
    from engines.sampler import check_guidance

    if loaded.text_encoder is None:
        asked = [flag for flag, v in (("--prompts", prompts), ("--negative-prompt", negative_prompt),
                                      ("--guidance-scale", guidance_scale)) if v is not None]
        if asked:
            raise AdpdmError(f"{', '.join(asked)} need(s) a text-to-image pipeline folder (tokenizer/ and text_encoder/ "
                             "beside unet/); for a bare conditional UNet give --prompt-embeds")
        return None
    folder = loaded.text_encoder.folder
    scale = check_guidance(default_guidance_scale(folder) if guidance_scale is None else guidance_scale)
    prompts = list(prompts) if prompts is not None else default_prompts(folder)
    embeds, truncated = loaded.text_encoder.encode(prompts)
    negative, _ = loaded.text_encoder.encode(["" if negative_prompt is None else negative_prompt])
    return PromptConditions({"encoder_hidden_states": embeds}, {"encoder_hidden_states": negative}, scale,
                            len(prompts), truncated)


def model_settings(pipeline: Path | None) -> dict[str, Any]:
    """A pipeline folder's own defaults from its MODEL_SETTINGS_FILE ({} when it has none), checked:
    `guidance_scale` a number >= 1, `prompts` a prompt file inside the folder."""
    if pipeline is None or not (Path(pipeline) / MODEL_SETTINGS_FILE).is_file():
        return {}
    from engines.json_files import read_json
    from engines.sampler import check_guidance

    path = Path(pipeline) / MODEL_SETTINGS_FILE
    settings = read_json(path, "model settings")
    if not isinstance(settings, dict):
        raise AdpdmError(f"{path} must hold a JSON object")
    if "guidance_scale" in settings:
        value = settings["guidance_scale"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdpdmError(f"{path}: guidance_scale must be a number, got {value!r}")
        check_guidance(float(value))
    name = settings.get("prompts")
    if name is not None and (not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts):
        raise AdpdmError(f"{path}: prompts must name a file inside the folder, got {name!r}")
    return settings


def default_guidance_scale(pipeline: Path | None = None) -> float:
    """The guidance scale used when the user gives none: the pipeline's own (MODEL_SETTINGS_FILE,
    e.g. the bundled reference-text model's), else DEFAULT_GUIDANCE_SCALE."""
    return float(model_settings(pipeline).get("guidance_scale", DEFAULT_GUIDANCE_SCALE))


def default_prompts(pipeline: Path | None = None) -> list[str]:
    """The prompt set calibration uses when the user gives none: the pipeline's own prompt file
    (MODEL_SETTINGS_FILE's `prompts`, e.g. reference-text's held-out phrasings), else generic captions."""
    name = model_settings(pipeline).get("prompts")
    return read_prompts(Path(pipeline) / name if name else DEFAULT_PROMPTS_FILE)  # type: ignore[arg-type]
