"""Preprocessing, defined once: training, evaluation and the service all import these presets.

Images enter as uint8 tensors (C, H, W) or batches (B, C, H, W), decoded by `load_rgb`, so that the
pixels the service sees are produced by exactly the same code as those the model was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(source) -> torch.Tensor:
    """File path or PIL image -> (3, H, W) uint8. Forces a full decode so that truncated files fail here."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    image.load()
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def train_preset(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    # UTKFace crops are aligned already: mild scale jitter, a horizontal flip, light colour jitter
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def eval_preset(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
