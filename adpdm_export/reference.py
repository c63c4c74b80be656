"""The bundled digits classifier and its real-data feature statistics, for quality metrics.

Both are written by `tools/train_reference.py` next to the reference UNet, so metrics
need neither the hub nor sklearn at runtime. Weights are read with safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

from adpdm_export.model_loading import REFERENCE_DIR
from calibration.digits_classifier import DigitsClassifier
from engines.errors import AdpdmError

CLASSIFIER_DIR = REFERENCE_DIR / "classifier"


def _need(path: Path) -> Path:
    if not path.is_file():
        raise AdpdmError(f"bundled reference file missing: {path}; reinstall adpdm-export or rerun tools/train_reference.py")
    return path


def load_reference_classifier(folder: Path = CLASSIFIER_DIR) -> DigitsClassifier:
    """The bundled classifier (eval mode, CPU, float32, no gradients)."""
    config = json.loads(_need(folder / "config.json").read_text())
    model = DigitsClassifier.from_config(config)
    model.load_state_dict(load_torch(_need(folder / "model.safetensors")), strict=True)
    model.requires_grad_(False)
    return model.eval()


def reference_real_feature_stats(folder: Path = CLASSIFIER_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma), float64, of the classifier's features over the full real digits set."""
    tensors = load_numpy(_need(folder / "real_features.safetensors"))
    return tensors["mu"].astype(np.float64), tensors["sigma"].astype(np.float64)
