"""Calibration's prompt policy for text-to-image pipelines: prompt files, the default prompt set,
and the one function that assembles data-free calibration's conditions (`calibration_conditions`,
for `adpdm calibrate` / `build-engine` and `adpdm.calibrate` / `adpdm.build_engine` alike).

Calibration must see what the UNet sees when serving: the pipeline's own text encoder(s)'
conditions for real prompts and, for classifier-free guidance, for the negative prompt (the empty
string by default; zeros where an SDXL pipeline forces them, as diffusers), never an all-zero
stand-in the pipeline would not use. The runtime parts (tokenizers + text encoders, SD and SDXL
layouts, VAE) are `engines/text_pipeline.py`, which the server runs too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from engines.errors import AdpdmError
from engines.text_pipeline import DEFAULT_GUIDANCE_SCALE, TEXT_INPUT

DEFAULT_PROMPTS_FILE = Path(__file__).parent / "assets" / "default_prompts.txt"
# A pipeline folder's own defaults for this tool (optional): {"guidance_scale": float, "prompts": "file.txt"}.
MODEL_SETTINGS_FILE = "adpdm.json"


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
class CalibrationConditions:
    """What data-free calibration samples with: the conditions (per sample, or K prompts cycled over
    the samples), the unconditional inputs of guidance (None without guidance), the guidance scale,
    and notes for the user (truncated prompts)."""

    cond: dict[str, torch.Tensor]
    uncond: Optional[dict[str, torch.Tensor]]
    guidance_scale: float
    notes: list[str]


def calibration_conditions(loaded: Any, samples: int, *, cond: Optional[Mapping[str, Any]] = None,
                           uncond: Optional[Mapping[str, Any]] = None, prompts: Optional[Sequence[str]] = None,
                           negative_prompt: Optional[str] = None,
                           guidance_scale: Optional[float] = None) -> CalibrationConditions:
    """The conditions of data-free calibration of `loaded` (a LoadedModel) over `samples` seeds.

    cond: the user's own conditions (class labels, prompt embeddings); inputs it lacks are the
    model's null/default ones. A text-to-image pipeline (a text encoder): `prompts` (default
    `default_prompts(folder)`, unless cond holds prompt embeddings) and the negative prompt (default "";
    zeros for an SDXL pipeline with `force_zeros_for_empty_prompt`, as diffusers; the unconditional
    half unless `uncond` is given) are encoded by the pipeline's own text encoder(s); guidance_scale defaults to the pipeline's own (`default_guidance_scale(folder)`: its adpdm.json, else 7.5). Other models: prompts are one
    AdpdmError line, and so is a guidance scale > 1 without `uncond`.
    """
    from engines.sampler import check_guidance

    user = dict(cond or {})
    out = {**loaded.default_condition(samples), **user}
    uncond = None if uncond is None else dict(uncond)
    if loaded.text_encoder is None:
        asked = [name for name, v in (("prompts", prompts), ("a negative prompt", negative_prompt)) if v is not None]
        if guidance_scale is not None and check_guidance(guidance_scale) > 1.0 and uncond is None:
            asked.append("a guidance scale")
        if asked:
            raise AdpdmError(f"{' and '.join(asked)} need(s) a text-to-image pipeline folder (tokenizer/ and "
                             "text_encoder/ beside unet/); for a bare conditional UNet give prompt embeddings "
                             "(--prompt-embeds) and, for guidance, the unconditional inputs")
        return CalibrationConditions(out, uncond, 1.0 if guidance_scale is None else check_guidance(guidance_scale), [])
    encoder = loaded.text_encoder
    scale = check_guidance(default_guidance_scale(encoder.folder) if guidance_scale is None else guidance_scale)
    notes = []
    if TEXT_INPUT in user:
        if prompts is not None:
            raise AdpdmError("give prompts or prompt embeddings (--prompt-embeds, cond['encoder_hidden_states']), "
                             "not both")
    else:
        texts = list(prompts) if prompts is not None else default_prompts(encoder.folder)
        encoded, truncated = encoder.conditions(texts)  # SDXL: also text_embeds and time_ids, K rows each
        out.update(encoded)
        if truncated:
            notes.append(f"{len(truncated)} prompt(s) longer than the tokenizer's {encoder.max_length} tokens were "
                         f"truncated (prompt {', '.join(str(i + 1) for i in truncated[:8])})")
    if uncond is None and scale > 1.0:
        uncond, truncated = encoder.negative_conditions(negative_prompt)
        if truncated:
            notes.append(f"the negative prompt is longer than the tokenizer's {encoder.max_length} tokens and was "
                         "truncated")
    return CalibrationConditions(out, uncond if scale > 1.0 else None, scale, notes)


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


__all__ = ["DEFAULT_GUIDANCE_SCALE", "MODEL_SETTINGS_FILE", "CalibrationConditions", "calibration_conditions",
           "default_guidance_scale", "default_prompts", "model_settings", "read_prompts"]
