"""Model-space images ([-1, 1]) to uint8 arrays and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: str | Path, ncols: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of the batch (1 px gaps), upscaled `scale` times with nearest neighbour."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    ncols = ncols or int(math.ceil(math.sqrt(b)))
    nrows = int(math.ceil(b / ncols))
    grid = np.zeros((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), dtype=np.uint8)
    for k in range(b):
        r, q = divmod(k, ncols)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = arr[k]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
