"""A text-to-image pipeline's runtime parts: prompt -> UNet conditioning, latents -> images.

Stable-Diffusion-layout pipeline folders hold `tokenizer/` (CLIPTokenizer) and `text_encoder/`
(CLIPTextModel) beside `unet/` (`TextEncoder`), and `vae/` (AutoencoderKL) for latent-space
pipelines; SDXL-layout ones also `tokenizer_2/` and `text_encoder_2/`
(CLIPTextModelWithProjection), and their UNet takes two added conditions (`SdxlTextEncoders`, as
diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids build them). The UNet
must see what the pipeline gives it: the encoders' outputs for the prompt and, for
classifier-free guidance, for the negative prompt (the empty string by default; zeros where an
SDXL pipeline says `force_zeros_for_empty_prompt` and no negative prompt is given, as diffusers),
never an all-zero stand-in the pipeline would not use. Both encoders give `conditions(prompts)`
and `negative_conditions(negative_prompt)`: dicts of the UNet's flat conditioning inputs
(engines/conditioning.py). Which encoders a pipeline has follows the UNet's conditioning spec
(the manifest's `model.conditioning`): `text_embeds` in it means SDXL. Weights are read from
safetensors only; a prompt longer than the tokenizer's limit is truncated and reported, as
diffusers does.

This is inference only (torch + transformers + diffusers, no training) and lives in `engines`
because the server (`engines/serving.py`) and the Triton repository's `generate` model run it;
calibration's policy (prompt files, the default prompt set) stays in `adpdm_export/text_prompts.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from engines.errors import AdpdmError
from engines.pretrained import check_safetensors, load_pretrained

DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default
DEFAULT_VAE_SCALE_FACTOR = 8  # diffusers' pipelines without a VAE config (and every SD/SDXL VAE)
TEXT_INPUT = "encoder_hidden_states"
PROMPT_INPUTS = (TEXT_INPUT, "text_embeds")  # the conditioning inputs a prompt determines
SDXL_PARTS = ("tokenizer_2", "text_encoder_2")
# what prompts -> images need (the SDXL parts where the folder has them)
PIPELINE_PARTS = ("model_index.json", "tokenizer", "text_encoder", *SDXL_PARTS, "vae")


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
        return {TEXT_INPUT: embeds}, truncated

    def negative_conditions(self, negative_prompt: Optional[str] = None) -> tuple[dict[str, torch.Tensor], bool]:
        """The unconditional half of guidance (one row): the negative prompt's encoding (default
        ""), and whether it was truncated."""
        cond, truncated = self.conditions(["" if negative_prompt is None else negative_prompt])
        return cond, bool(truncated)


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
            TEXT_INPUT: torch.cat(hidden, dim=-1).to(torch.float32),
            "text_embeds": pooled.to(torch.float32),
            "time_ids": torch.tensor([self.time_ids], dtype=torch.float32).expand(k, -1).clone(),
        }, sorted(truncated)

    def negative_conditions(self, negative_prompt: Optional[str] = None) -> tuple[dict[str, torch.Tensor], bool]:
        """As diffusers: zero embeddings when no negative prompt is given and the pipeline says
        `force_zeros_for_empty_prompt`, else the negative prompt's encoding (default ""); the time
        ids are the conditional half's. Also whether the negative prompt was truncated."""
        cond, truncated = self.conditions(["" if negative_prompt is None else negative_prompt])
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            cond[TEXT_INPUT].zero_()
            cond["text_embeds"].zero_()
        return cond, bool(truncated)


AnyTextEncoder = Union[TextEncoder, SdxlTextEncoders]


def is_sdxl(conditioning: Mapping[str, Any]) -> bool:
    """An SDXL-layout UNet's conditioning spec: it takes the added conditions."""
    return "text_embeds" in conditioning


def _scale_of(vae_config: Optional[Mapping[str, Any]]) -> int:
    blocks = None if vae_config is None else vae_config.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if isinstance(blocks, (list, tuple)) and blocks else DEFAULT_VAE_SCALE_FACTOR


def vae_scale_factor(pipeline: Optional[Path]) -> int:
    """2 ** (number of VAE blocks - 1), as diffusers' pipelines compute it; 8 without a VAE config."""
    from engines.json_files import read_json

    config = None if pipeline is None else Path(pipeline) / "vae" / "config.json"
    return _scale_of(read_json(config, "VAE config") if config is not None and config.is_file() else None)


def sdxl_time_ids(pipeline: Optional[Path], sample_size: Sequence[int]) -> tuple[float, ...]:
    """StableDiffusionXLPipeline's default time ids: original size = target size = the UNet's
    sample size x the VAE scale factor, crop (0, 0)."""
    f = vae_scale_factor(pipeline)
    h, w = int(sample_size[0]) * f, int(sample_size[1]) * f
    return (float(h), float(w), 0.0, 0.0, float(h), float(w))


def _text_width(conditioning: Mapping[str, Any], pipeline: Path) -> int:
    spec = conditioning.get(TEXT_INPUT)
    if not spec or spec.get("dim") is None:
        raise AdpdmError(f"{pipeline}: the UNet has no cross-attention; prompts apply to text-to-image pipelines")
    return int(spec["dim"])


def check_text_pipeline_folder(pipeline: Path, conditioning: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """A pipeline folder's text parts, checked against the UNet's conditioning spec without loading
    any weights: tokenizer/ and text_encoder/ present (and tokenizer_2/, text_encoder_2/ for an
    SDXL-layout UNet), safetensors only (also in vae/), the encoders' widths equal to the UNet's
    cross-attention (SDXL: their sum) and, for SDXL, text_encoder_2's projection equal to the
    UNet's text_embeds; returns the VAE's config (None: no vae/, a pixel-space pipeline)."""
    from engines.json_files import read_json

    pipeline = Path(pipeline)
    width = _text_width(conditioning, pipeline)
    sdxl = is_sdxl(conditioning)
    dirs = ["tokenizer", "text_encoder", *(SDXL_PARTS if sdxl else ())]
    missing = [d + "/" for d in dirs if not (pipeline / d).is_dir()]
    if missing:
        layout = ("an SDXL pipeline needs tokenizer/, text_encoder/, tokenizer_2/ and text_encoder_2/" if sdxl
                  else "a text-to-image pipeline needs tokenizer/ and text_encoder/")
        raise AdpdmError(f"pipeline folder {pipeline} lacks {' and '.join(missing)} ({layout})")
    configs = []
    for enc in [d for d in dirs if d.startswith("text_encoder")]:
        check_safetensors(pipeline / enc, "text encoder")
        configs.append(read_json(pipeline / enc / "config.json", "text encoder config"))
    hidden = [c.get("hidden_size") for c in configs]
    if any(not isinstance(h, int) for h in hidden) or sum(hidden) != width:
        if sdxl:
            raise AdpdmError(f"the text encoders in {pipeline} give {hidden[0]} + {hidden[1]} = "
                             f"{sum(h for h in hidden if isinstance(h, int))}-wide embeddings, the UNet's cross-attention "
                             f"takes {width}: they are not one pipeline")
        raise AdpdmError(f"the text encoder in {pipeline / 'text_encoder'} gives {hidden[0]}-wide embeddings, the "
                         f"UNet's cross-attention takes {width}: they are not one pipeline")
    if sdxl:
        pooled = int(conditioning["text_embeds"]["dim"])
        proj = configs[1].get("projection_dim")
        if proj != pooled:
            raise AdpdmError(f"text_encoder_2 in {pipeline} projects to {proj}, the UNet's added embedding takes "
                             f"{pooled}-wide text_embeds: they are not one pipeline")
    vae_dir = pipeline / "vae"
    if not vae_dir.is_dir():
        return None
    check_safetensors(vae_dir, "VAE")
    return read_json(vae_dir / "config.json", "VAE config")


def _load_one(tok_dir: Path, enc_dir: Path, cls_name: str) -> TextEncoder:
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - a dependency
        raise AdpdmError("text-to-image pipelines need `transformers`: pip install transformers") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        raise AdpdmError(f"could not load the tokenizer from {tok_dir}: {str(e).strip()[:200] or type(e).__name__}") from None
    model = load_pretrained(getattr(transformers, cls_name), enc_dir, f"the text encoder ({cls_name})").eval()
    model.requires_grad_(False)
    return TextEncoder(tokenizer=tokenizer, model=model, folder=enc_dir.parent)


def load_text_encoder(pipeline: Path, conditioning: Mapping[str, Any]) -> AnyTextEncoder:
    """The tokenizer(s) and text encoder(s) of a pipeline folder, checked against the UNet's
    conditioning spec (`check_text_pipeline_folder`): one CLIP encoder (Stable Diffusion), or two
    and the added conditions where the UNet takes `text_embeds` (SDXL; the time ids are the spec's
    `time_ids.default`, which the loader and every build record)."""
    pipeline = Path(pipeline)
    check_text_pipeline_folder(pipeline, conditioning)
    first = _load_one(pipeline / "tokenizer", pipeline / "text_encoder", "CLIPTextModel")
    if not is_sdxl(conditioning):
        return first
    from engines.json_files import read_json

    time_ids = (conditioning.get("time_ids") or {}).get("default")
    if not isinstance(time_ids, (list, tuple)) or len(time_ids) != 6:
        raise AdpdmError(f"{pipeline}: the UNet's conditioning spec gives no default time_ids (6 numbers: the "
                         "pipeline's size and crop), which prompts on an SDXL pipeline need")
    second = _load_one(pipeline / "tokenizer_2", pipeline / "text_encoder_2", "CLIPTextModelWithProjection")
    index = read_json(pipeline / "model_index.json", "pipeline index") if (pipeline / "model_index.json").is_file() else {}
    if first.max_length != second.max_length:
        raise AdpdmError(f"{pipeline}: tokenizer/ pads to {first.max_length} tokens, tokenizer_2/ to {second.max_length}: "
                         "the two encoders' hidden states must have one length")
    return SdxlTextEncoders(first, second, tuple(float(v) for v in time_ids),
                            bool(index.get("force_zeros_for_empty_prompt", True)), pipeline)  # diffusers' default: True


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

    text_encoder: AnyTextEncoder
    decoder: Optional[LatentDecoder]
    folder: Path

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents if self.decoder is None else self.decoder.decode(latents)

    def image_shape(self, sample_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(sample_shape) if self.decoder is None else self.decoder.image_shape(sample_shape)  # type: ignore


def load_text_pipeline(folder: str | Path, conditioning: Mapping[str, Any]) -> TextPipeline:
    """The text encoder(s) and VAE of a pipeline folder, checked against the UNet's conditioning spec."""
    folder = Path(folder)
    return TextPipeline(load_text_encoder(folder, conditioning), load_latent_decoder(folder), folder)


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
    return load_text_pipeline(folder, manifest.model.conditioning)


# --------------------------------------------------------------------------- a prompt request


@dataclass(frozen=True)
class PromptRequest:
    """A prompt, its negative prompt (the unconditional half; None: not given, which the encoder
    reads as "" or, for an SDXL pipeline with `force_zeros_for_empty_prompt`, as zeros, as
    diffusers) and the guidance scale."""

    prompt: str
    negative_prompt: Optional[str] = None
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE

    def __post_init__(self) -> None:
        from engines.sampler import check_guidance

        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str) and not (name == "negative_prompt" and self.negative_prompt is None):
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
    negative = _one_string("negative_prompt", given["negative_prompt"]) if "negative_prompt" in given else None
    return PromptRequest(_one_string("prompt", given["prompt"]), negative, guidance)


@dataclass
class GuidedConditions:
    """What the sampling loop takes for a prompt: the conditional and unconditional inputs (None
    without guidance), the guidance scale, and a note per input that was truncated."""

    cond: dict[str, torch.Tensor]
    uncond: Optional[dict[str, torch.Tensor]]
    guidance_scale: float
    notes: list[str]


def _rows(cond: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def guided_conditions(text_encoder: AnyTextEncoder, request: PromptRequest, n: int,
                      base: Optional[Mapping[str, torch.Tensor]] = None) -> GuidedConditions:
    """The prompt's conditions for `n` images (and the negative prompt's, with guidance > 1), over
    `base` (the model's other conditions, per item: class labels, or an SDXL UNet's `time_ids`,
    which win over the encoder's default ones; the inputs a prompt determines, `PROMPT_INPUTS`,
    always come from the encoder); `adpdm sample --prompt` and the servers call this."""
    base = {k: v for k, v in (base or {}).items() if k not in PROMPT_INPUTS}
    encoded, truncated = text_encoder.conditions([request.prompt])
    notes = [f"the prompt is longer than the tokenizer's {text_encoder.max_length} tokens and was truncated"
             ] if truncated else []
    cond = {**_rows(encoded, n), **base}
    uncond = None
    if request.guidance_scale > 1.0:
        negative, cut = text_encoder.negative_conditions(request.negative_prompt)
        if cut:
            notes.append(f"the negative prompt is longer than the tokenizer's {text_encoder.max_length} tokens "
                         "and was truncated")
        uncond = {**_rows(negative, n), **base}
    return GuidedConditions(cond, uncond, request.guidance_scale, notes)
