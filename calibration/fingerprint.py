"""A content hash of a model's weights: ties calibrations, caches and builds to one model."""

from __future__ import annotations

import hashlib

import torch


def model_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes) in name order.

    Independent of file layout and device, so the same weights loaded from a UNet
    folder or a pipeline folder hash the same.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
