"""The digits classifier whose penultimate features define the Frechet distance metric.

It is trained by `tools/train_reference.py` on the same 16x16, 1-channel, [-1, 1]
images the reference UNet generates, so it can judge generated digits without any
hub download. Pure PyTorch: loading from disk lives in `adpdm_export.reference`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# The constructor arguments a config.json must (or may) carry; other keys are metadata.
ARCH_KEYS = ("in_channels", "image_size", "channels", "feature_dim", "num_classes", "dropout")


def prepare_digits(digits: Any, image_size: int = 16) -> torch.Tensor:
    """sklearn `load_digits` pixels (N, 64) or (N, 8, 8), values 0..16 -> (N, 1, S, S) in [-1, 1].

    Bilinear upsampling of values in [0, 1] stays in [0, 1], so the result is in [-1, 1].
    The reference UNet and the classifier both live in this space.
    """
    x = torch.as_tensor(digits, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


class DigitsClassifier(nn.Module):
    """Small CNN: two conv stages (each two 3x3 convs + 2x2 max-pool), a feature layer, logits.

    `features(x)` is the post-ReLU output of the feature layer (what Frechet distance
    uses); `forward(x)` returns logits over the 10 digits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 16,
        channels: tuple[int, ...] | list[int] = (32, 64),
        feature_dim: int = 64,
        num_classes: int = 10,
        dropout: float = 0.3,
    ):
        super().__init__()
        self.config = {
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "channels": [int(c) for c in channels],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
            "dropout": float(dropout),
        }
        if image_size % (2 ** len(channels)):
            raise ValueError(f"image_size {image_size} is not divisible by 2**{len(channels)} (one pool per stage)")
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            layers += [
                nn.Conv2d(prev, c, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            prev = c
        self.body = nn.Sequential(*layers)
        side = image_size // (2 ** len(channels))
        self.feature = nn.Linear(prev * side * side, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DigitsClassifier":
        """Rebuild from a config.json dict; keys outside ARCH_KEYS (metadata) are ignored."""
        return cls(**{k: config[k] for k in ARCH_KEYS if k in config})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, feature_dim) of images (B, C, S, S) in [-1, 1]."""
        return F.relu(self.feature(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
