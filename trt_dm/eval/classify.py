"""Class accuracy of generated images: does an image show the class it was asked for?

A small CNN classifier trained by this project on Fashion-MNIST (``tools/train_classifier.py``; weights, as
safetensors, and its test accuracy in ``models/classifier/``) labels each generated image; the class accuracy
is the share of images whose predicted class is the requested label. The classifier sees images as the
models make them: (N, 1, 32, 32) in [-1, 1] (28 x 28 Fashion-MNIST padded with background).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from trt_dm.models.loading import EMBEDDED_ROOT

CLASSIFIER_DIR = EMBEDDED_ROOT / "classifier"
WEIGHTS = "classifier.safetensors"


class FashionCNN(nn.Module):
    """Three conv blocks (16, 32, 64 channels; 32 -> 16 -> 8 -> 4 px), global average pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 64))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(directory: str | os.PathLike | None = None) -> FashionCNN:
    """The shipped classifier (eval mode), from safetensors only; FileNotFoundError names how to make it."""
    from safetensors.torch import load_file
    d = Path(directory) if directory is not None else CLASSIFIER_DIR
    if not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"class-accuracy classifier missing: {d / WEIGHTS}; train it with "
                                "`python tools/train_classifier.py`")
    meta = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    net = FashionCNN(int(meta.get("num_classes", 10)))
    net.load_state_dict(load_file(str(d / WEIGHTS)), strict=True)
    return net.eval()


@torch.no_grad()
def predict(images: torch.Tensor, net: nn.Module | None = None, batch_size: int = 256) -> torch.Tensor:
    """Predicted class (N,) int64 of images (N, 1, 32, 32) in [-1, 1]."""
    if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
        raise ValueError(f"the classifier takes (N, 1, 32, 32) images in [-1, 1]; got {tuple(images.shape)}")
    net = net or load_classifier()
    out = [net(images[i:i + batch_size].float()).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, net: nn.Module | None = None) -> float:
    """Share of images whose predicted class is the requested label."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((predict(images, net) == labels.to(torch.int64)).double().mean())


def paired_accuracy(reference: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                    net: nn.Module | None = None) -> dict:
    """Class accuracy of ``images`` against that of ``reference`` drawn with the same seeds and labels (image i of
    both asked for labels[i]): the change in points with its 95 % confidence interval from the per-image paired
    differences (normal approximation: d_i = correct_i - reference correct_i in {-1, 0, 1}, mean +- 1.96 sd/sqrt(n)),
    and the share of images both classify the same (``agreement``). Pairing removes the variance the two sets
    share, so the interval is narrower than that of two independent accuracies when the images stay close."""
    if not len(reference) == len(images) == len(labels):
        raise ValueError(f"{len(reference)} reference images, {len(images)} images, {len(labels)} labels: "
                         "a paired comparison needs one of each per image")
    net = net or load_classifier()
    labels = labels.to(torch.int64)
    pr, pi = predict(reference, net), predict(images, net)
    d = (pi == labels).double() - (pr == labels).double()
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    half = 1.96 * float(d.std(unbiased=True)) / n ** 0.5 if n > 1 else float("nan")
    return {"change_points": 100 * mean, "ci95_points": [100 * (mean - half), 100 * (mean + half)],
            "agreement": float((pr == pi).double().mean()) if n else float("nan"), "n": n}
