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
from engines.conditioning import default_condition
from engines.errors import AdpdmError
from engines.json_files import read_json

SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
REFERENCE_NAME = "reference"
REFERENCE_DIR = Path(__file__).parent / "assets" / "reference"
REFERENCE_TEXT_NAME = "reference-text"
REFERENCE_TEXT_DIR = Path(__file__).parent / "assets" / "reference_text"
# The models shipped in the package, by the name users give (docs/reference-model.md).
BUNDLED_MODELS = {REFERENCE_NAME: REFERENCE_DIR, REFERENCE_TEXT_NAME: REFERENCE_TEXT_DIR}
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
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
    text_encoder: Any = None  # adpdm_export.text_prompts.TextEncoder of a text-to-image pipeline folder
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
        """Null conditioning for `batch` items: a text pipeline's encoding of the empty prompt (what
        the UNet sees unconditionally), else engines.conditioning.default_condition."""
        cond = default_condition(self.conditioning, batch)
        if self.text_encoder is not None:
            cond["encoder_hidden_states"] = self.empty_prompt().expand(batch, -1, -1).clone()
        return cond

    def empty_prompt(self) -> torch.Tensor:
        """(1, L, D) embedding of the empty prompt (needs the text encoder)."""
        if self.text_encoder is None:
            raise AdpdmError("this model has no text encoder (a text-to-image pipeline folder has tokenizer/ and "
                             "text_encoder/)")
        return self.text_encoder.encode([""])[0]


def _conditioning_of(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    cond: dict[str, Any] = {}
    if kind == "UNet2DConditionModel":
        dim = config.get("cross_attention_dim") or 1280
        if isinstance(dim, (list, tuple)):
            dim = dim[0]
        cond["encoder_hidden_states"] = {"dim": int(dim)}
        if config.get("addition_embed_type"):
            raise AdpdmError(
                f"UNet2DConditionModel with addition_embed_type={config['addition_embed_type']!r} "
                "(SDXL-style added conditions) is not supported yet"
            )
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


def _check_unet_config(config: Any, where: Path) -> dict[str, Any]:
    """The fields this tool reads from a UNet config, checked before diffusers builds the model."""
    sample_size_of(config, str(where))
    for key in ("in_channels", "out_channels"):
        if key in config:
            _positive_int(config[key], f"{where}: {key}")
    return config


def load_pretrained(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder)` from safetensors; corrupted or mismatched files are one line
    naming the folder and the cause (diffusers' and transformers' errors run to pages)."""
    try:
        return cls.from_pretrained(str(folder), use_safetensors=True, **kwargs)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdpdmError(f"could not load {what} from {folder}: {msg[:300]}") from None


def _load_unet_folder(folder: Path, source: str) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    config = _check_unet_config(read_json(folder / "config.json", "UNet config"), folder / "config.json")
    kind = config.get("_class_name")
    if kind not in SUPPORTED_CLASSES:
        raise AdpdmError(
            f"{folder} holds a {kind or 'model without _class_name'}; supported: {', '.join(SUPPORTED_CLASSES)}"
        )
    weights = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
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
    unet = unet.eval()
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
            allow_patterns=["model_index.json", "*.json", "*.safetensors", "tokenizer/*"],
            ignore_patterns=["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "text_encoder_2/*", "vae/*"],
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
    text_encoder = None
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json", "pipeline index")
        if not (folder / "unet" / "config.json").is_file():
            raise AdpdmError(f"pipeline folder {folder} has no unet/config.json (pipeline {index.get('_class_name')})")
        unet, kind, config = _load_unet_folder(folder / "unet", src)
        sched = _scheduler_config_near(folder / "unet")
        if kind == "UNet2DConditionModel" and ("text_encoder" in index or (folder / "text_encoder").exists()):
            from adpdm_export.text_prompts import load_text_encoder

            text_encoder = load_text_encoder(folder, config.get("cross_attention_dim"))
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
    conditioning = _conditioning_of(kind, config)
    if text_encoder is not None:
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
