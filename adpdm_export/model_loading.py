"""Loading a diffusion UNet and its scheduler config from every source a user may name.

Sources: `reference` / `reference-text` (the bundled models, BUNDLED_MODELS), a diffusers UNet folder (config.json +
safetensors), a diffusers pipeline folder (model_index.json, unet/, scheduler/), or a
Hugging Face repo id (needs the hub). Weights are read from safetensors only: pickle
files (.bin, .ckpt, .pt) are refused, never unpickled.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calibration.fingerprint import model_sha256
from calibration.trajectories import expand_cond
from engines.conditioning import SDXL_TIME_IDS, accept_added_cond_inputs, default_condition
from engines.errors import AdpdmError
from engines.json_files import read_json
from engines.pretrained import PICKLE_SUFFIXES, load_pretrained

SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
REFERENCE_NAME = "reference"
REFERENCE_DIR = Path(__file__).parent / "assets" / "reference"
REFERENCE_TEXT_NAME = "reference-text"
REFERENCE_TEXT_DIR = Path(__file__).parent / "assets" / "reference_text"
# The models shipped in the package, by the name users give (docs/reference-model.md).
BUNDLED_MODELS = {REFERENCE_NAME: REFERENCE_DIR, REFERENCE_TEXT_NAME: REFERENCE_TEXT_DIR}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# diffusers' DDPMScheduler defaults: used when a bare UNet folder ships no scheduler config.
DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


@dataclass
class LoadedModel:
    """A UNet ready to run (eval mode, float32, CPU) and what the rest of the tool needs to know of it."""

    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    source: str
    kind: str
    sample_size: tuple[int, int]
    in_channels: int
    out_channels: int
    conditioning: dict[str, Any] = field(default_factory=dict)
    scheduler_config_found: bool = True
    text_encoder: Any = None  # engines.text_pipeline.TextEncoder | SdxlTextEncoders of a text-to-image pipeline
    _sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = model_sha256(self.unet)
        return self._sha256

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.sample_size)

    def default_condition(self, batch: int) -> dict[str, torch.Tensor]:
        """Null conditioning for `batch` items: a text pipeline's unconditional inputs (the empty
        prompt's encoding; zeros where an SDXL pipeline forces them, as diffusers), else
        engines.conditioning.default_condition."""
        cond = default_condition(self.conditioning, batch)
        if self.text_encoder is not None:
            cond.update(expand_cond(self.text_encoder.negative_conditions(None)[0], batch))
        return cond


def conditioning_of(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """The conditioning spec (engines/manifest_schema.py, ModelInfo.conditioning) of a UNet config."""
    cond: dict[str, Any] = {}
    if kind == "UNet2DConditionModel":
        dim = config.get("cross_attention_dim") or 1280
        if isinstance(dim, (list, tuple)):
            dim = dim[0]
        cond["encoder_hidden_states"] = {"dim": int(dim)}
        added = config.get("addition_embed_type")
        if added == "text_time":  # SDXL: text_embeds (B, P) and time_ids (B, 6) into one added embedding
            t_dim = config.get("addition_time_embed_dim")
            total = config.get("projection_class_embeddings_input_dim")
            pooled = total - SDXL_TIME_IDS * t_dim if all(
                isinstance(v, int) and not isinstance(v, bool) for v in (t_dim, total)) else 0
            if pooled < 1:
                raise AdpdmError(
                    f"addition_embed_type='text_time' needs addition_time_embed_dim and projection_class_embeddings_"
                    f"input_dim with room for {SDXL_TIME_IDS} time ids and the text embeds, got {t_dim!r} and {total!r}"
                )
            cond["text_embeds"] = {"dim": pooled}
            cond["time_ids"] = {"dim": SDXL_TIME_IDS}
        elif added:
            raise AdpdmError(f"UNet2DConditionModel with addition_embed_type={added!r} is not supported (of the added "
                             "conditions only SDXL's 'text_time' is)")
    n = config.get("num_class_embeds")
    if n and config.get("class_embed_type") in (None, "embedding", "identity"):
        cond["class_labels"] = {"num_classes": int(n)}
    elif config.get("class_embed_type") not in (None,):
        raise AdpdmError(f"class_embed_type={config['class_embed_type']!r} is not supported yet")
    return cond


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdpdmError(f"{what} must be a positive integer, got {value!r}")
    return value


def sample_size_of(config: dict[str, Any], where: str) -> tuple[int, int]:
    """(H, W) from a UNet config's sample_size (an int or a pair; diffusers' default 64 when absent)."""
    size = config.get("sample_size")
    if size is None:
        return (64, 64)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (_positive_int(size[0], f"{where}: sample_size"), _positive_int(size[1], f"{where}: sample_size"))
    return (_positive_int(size, f"{where}: sample_size"),) * 2  # type: ignore[return-value]


def unet_conditioning(kind: str, config: dict[str, Any], pipeline: Path | None) -> dict[str, Any]:
    """`conditioning_of` with, for an SDXL-layout UNet, the time ids the pipeline passes when not
    told otherwise as `time_ids.default` (engines.text_pipeline.sdxl_time_ids; a bare UNet: an SDXL
    VAE's x8)."""
    conditioning = conditioning_of(kind, config)
    if "time_ids" in conditioning:
        from engines.text_pipeline import sdxl_time_ids

        conditioning["time_ids"]["default"] = list(sdxl_time_ids(pipeline, sample_size_of(config, str(pipeline))))
    return conditioning


def _check_unet_config(config: Any, where: Path) -> dict[str, Any]:
    """The fields this tool reads from a UNet config, checked before diffusers builds the model."""
    sample_size_of(config, str(where))
    for key in ("in_channels", "out_channels"):
        if key in config:
            _positive_int(config[key], f"{where}: {key}")
    return config


def _load_unet_folder(folder: Path, source: str) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    config = _check_unet_config(read_json(folder / "config.json", "UNet config"), folder / "config.json")
    kind = config.get("_class_name")
    if kind not in SUPPORTED_CLASSES:
        raise AdpdmError(
            f"{folder} holds a {kind or 'model without _class_name'}; supported: {', '.join(SUPPORTED_CLASSES)}"
        )
    conditioning_of(kind, config)  # conditioning this tool cannot export: one line before diffusers reads the weights
    weights = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdpdmError(
                f"{folder} has only pickle weights ({', '.join(pickles)}); this tool never unpickles files. "
                "Convert them to safetensors (diffusers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise AdpdmError(f"{folder} has config.json but no .safetensors weights")
    import diffusers

    unet = load_pretrained(getattr(diffusers, kind), folder, f"{kind} weights", low_cpu_mem_usage=False)
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        unet = unet.to(torch.float32)
    unet = accept_added_cond_inputs(unet.eval())  # SDXL: text_embeds / time_ids as keywords of their own
    unet.requires_grad_(False)
    return unet, kind, config


def _scheduler_config_near(folder: Path) -> dict[str, Any] | None:
    for cand in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return read_json(cand, "scheduler config")
    return None


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise AdpdmError("huggingface_hub is not installed; cannot download models") from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["model_index.json", "*.json", "*.safetensors", "tokenizer/*", "tokenizer_2/*"],
            ignore_patterns=["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "vae/*"],
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdpdmError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {first[:200]}). "
            "Offline? Download it elsewhere and pass the local folder instead"
        ) from None
    return Path(path)


def absolute_source(source: str) -> str:
    """Local folders as absolute paths (so `adpdm eval` and `sample --prompt` find them from any
    directory); names (`reference`, hub ids) as given."""
    p = Path(source).expanduser()
    return str(p.resolve()) if source not in BUNDLED_MODELS and p.exists() else source


def bundled_folder(name: str) -> Path | None:
    """The folder of a bundled model named `name` (BUNDLED_MODELS), None for any other source; a
    bundled model missing from the installation is one AdpdmError line."""
    folder = BUNDLED_MODELS.get(str(name))
    if folder is None:
        return None
    if not (folder / "model_index.json").is_file():
        raise AdpdmError(f"the bundled model {name!r} is missing from {folder}; reinstall adpdm-export")
    return folder


def bundled_pipeline_of_build(build_dir: str | os.PathLike) -> Path | None:
    """The bundled pipeline folder a build was made from, when its manifest names a bundled model
    (`reference-text`): builds record such sources by name, which `engines` cannot resolve; None
    for any other build or folder."""
    if not (Path(build_dir) / "manifest.json").is_file():
        return None
    from engines.manifest import load_manifest

    return bundled_folder(load_manifest(build_dir, verify=False).model.source)


def load_model(source: str | os.PathLike) -> LoadedModel:
    """Load the UNet named by `source` (see module doc) on the CPU in eval mode."""
    src = str(source)
    bundled = bundled_folder(src)
    if bundled is not None:
        folder = bundled
    else:
        folder = Path(src).expanduser()
        if not folder.exists():
            if _REPO_ID.match(src) and not src.startswith((".", "/", "~")):
                folder = _from_hub(src)
            else:
                raise AdpdmError(f"no such model folder: {src}")
        if folder.is_file():
            raise AdpdmError(f"{src} is a file; give the folder of a diffusers UNet or pipeline")
    found_scheduler = True
    text_pipeline = False
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json", "pipeline index")
        if not (folder / "unet" / "config.json").is_file():
            raise AdpdmError(f"pipeline folder {folder} has no unet/config.json (pipeline {index.get('_class_name')})")
        unet, kind, config = _load_unet_folder(folder / "unet", src)
        sched = _scheduler_config_near(folder / "unet")
        text_pipeline = kind == "UNet2DConditionModel" and ("text_encoder" in index or (folder / "text_encoder").exists())
    elif (folder / "config.json").is_file():
        unet, kind, config = _load_unet_folder(folder, src)
        sched = _scheduler_config_near(folder)
    else:
        names = sorted(p.name for p in folder.iterdir())
        listing = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "") or "nothing"
        raise AdpdmError(
            f"{folder} is neither a diffusers UNet folder (config.json) nor a pipeline folder "
            f"(model_index.json); it holds: {listing}"
        )
    if sched is None:
        found_scheduler = False
        sched = dict(DEFAULT_SCHEDULER_CONFIG)
    size = sample_size_of(config, str(folder))
    conditioning = unet_conditioning(kind, config, folder if (folder / "model_index.json").is_file() else None)
    text_encoder = None
    if text_pipeline:
        from engines.text_pipeline import load_text_encoder

        text_encoder = load_text_encoder(folder, conditioning)
        conditioning["encoder_hidden_states"]["sequence_length"] = text_encoder.max_length
    return LoadedModel(
        unet=unet,
        scheduler_config=sched,
        source=src,
        kind=kind,
        sample_size=size,
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        conditioning=conditioning,
        scheduler_config_found=found_scheduler,
        text_encoder=text_encoder,
    )
