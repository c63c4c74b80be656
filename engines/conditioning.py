"""Default conditioning inputs for a model, from its conditioning spec (as in the manifest)."""

from __future__ import annotations

from typing import Any, Mapping

import torch


def default_condition(conditioning: Mapping[str, Mapping[str, Any]], batch: int) -> dict[str, torch.Tensor]:
    """Conditioning inputs for `batch` items when the user gives none.

    Cross-attention models get a null (all-zero) embedding, one token or the fixed sequence
    length the build declares (a text pipeline's loader gives the empty prompt's encoding
    instead: `LoadedModel.default_condition`); class-conditional models get labels 0, 1, 2, ...
    cycling over the classes.
    """
    cond: dict[str, torch.Tensor] = {}
    if "encoder_hidden_states" in conditioning:
        spec = conditioning["encoder_hidden_states"]
        cond["encoder_hidden_states"] = torch.zeros(batch, int(spec.get("sequence_length") or 1), int(spec["dim"]))
    if "class_labels" in conditioning:
        n = int(conditioning["class_labels"]["num_classes"])
        cond["class_labels"] = torch.arange(batch, dtype=torch.int64) % n
    return cond
