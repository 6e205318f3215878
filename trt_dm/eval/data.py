"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files, MIT licence).

Images are returned as float32 tensors in [-1, 1], shape (N, 1, 32, 32): the 28x28 originals padded
by 2 pixels of background (-1) on every side, the layout the default model is trained on.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "TRT_DM_FASHION_MNIST"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# Fashion-MNIST's ten classes, in label order (Xiao et al. 2017).
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")

def dataset_dir() -> Path:
    return Path(os.environ.get(ENV_VAR, DEFAULT_DIR))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    # IDX format: magic (0, 0, dtype=0x08 ubyte, ndim), ndim big-endian uint32 sizes, raw bytes.
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise ValueError(f"{path}: not an unsigned-byte IDX file with {ndim} dimensions "
                         f"(header {zero:#x} {dtype:#x} {dims})")
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} bytes of data, found {arr.size}")
    return arr.reshape(shape)


def load_uint8(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Raw images (N, 28, 28) uint8 and labels (N,) uint8 of one split ('train' or 'test')."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; accepted: {sorted(_FILES)}")
    root = dataset_dir()
    img_name, lbl_name = _FILES[split]
    if not (root / img_name).is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {root / img_name}. Install the Debian package "
            f"(apt-get install dataset-fashion-mnist) or set {ENV_VAR} to a folder with the IDX .gz files.")
    return _read_idx(root / img_name, 3), _read_idx(root / lbl_name, 1)


def to_model_range(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32) in [-1, 1], padded with background (-1)."""
    x = torch.from_numpy(np.array(images_u8, dtype=np.float32)) / 127.5 - 1.0
    x = x.unsqueeze(1)
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def load(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in model range (N, 1, 32, 32) and labels (N,) int64."""
    imgs, labels = load_uint8(split)
    if limit is not None:
        imgs, labels = imgs[:limit], labels[:limit]
    return to_model_range(imgs), torch.as_tensor(labels.astype(np.int64))
