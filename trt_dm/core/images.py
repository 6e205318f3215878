"""Image grids and raw-sample files: what a person looks at, written atomically."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding half up as torchvision's save_image."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 + 0.5).floor().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile images into one picture: ``nrow`` per row (default: square), ``pad`` px white borders."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 2) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"grid path must end in .png, .jpg or .jpeg, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    make_grid(images, nrow=nrow, scale=scale).save(tmp)
    os.replace(tmp, path)
    return path


def save_samples(images: torch.Tensor, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Raw float32 samples (model range) as safetensors, key "samples"."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"raw samples are written as .safetensors, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"samples": images.detach().float().cpu().contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
