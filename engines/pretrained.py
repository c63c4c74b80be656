"""Loading diffusers / transformers parts from local folders: safetensors only, one-line errors.

Shared by the UNet loader (adpdm_export/model_loading.py) and the runtime parts of a text-to-image
pipeline (engines/text_pipeline.py: text encoder, VAE), which the server loads too, so it lives
in the bottom layer. Pickle files are refused, never unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.errors import AdpdmError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def check_safetensors(folder: Path, what: str) -> None:
    """`folder` holds .safetensors weights; else one line (naming any pickle files it holds instead)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdpdmError(f"{what} {folder} has only pickle weights ({', '.join(pickles)}); this tool never unpickles "
                         "files: convert them to safetensors (save_pretrained(dir, safe_serialization=True))")
    raise AdpdmError(f"{what} {folder} has no .safetensors weights")


def load_pretrained(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder)` from safetensors; corrupted or mismatched files are one line
    naming the folder and the cause (diffusers' and transformers' errors run to pages)."""
    try:
        return cls.from_pretrained(str(folder), use_safetensors=True, **kwargs)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdpdmError(f"could not load {what} from {folder}: {msg[:300]}") from None
