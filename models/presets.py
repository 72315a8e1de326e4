"""Preprocessing, defined once: training, evaluation and the service all use these presets.

Images enter as uint8 tensors (C, H, W) or batches (B, C, H, W), decoded by `load_rgb`, so that the
pixels the service sees are produced by exactly the same code as those the model was trained on.
`ArrayPreset` is `eval_preset` written in numpy for the serving path, which runs without torch (the CPU
image has none); tests/test_network.py holds the two equal. torch is imported inside the torch presets
so that importing this module stays cheap.
"""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(source):
    """File path or PIL image -> (3, H, W) uint8 tensor. Forces a full decode so truncated files fail here."""
    import torch
    from PIL import Image

    image = source if isinstance(source, Image.Image) else Image.open(source)
    image.load()
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def train_preset(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    import torch
    from torchvision.transforms import v2

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


def eval_preset(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


@cache
def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of antialiased bilinear resizing: a triangle filter, widened by the scale when
    shrinking (the filter of torchvision's `Resize(antialias=True)` and Pillow's BILINEAR)."""
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale  # output pixel centres in input coordinates
    taps = np.arange(n_in) + 0.5
    w = np.clip(1 - np.abs(taps[None, :] - centres[:, None]) / max(scale, 1.0), 0, None)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


class ArrayPreset:
    """`eval_preset` in numpy/OpenCV: resize to (S, S), scale to [0, 1], normalise, channels first."""

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.size = image_size
        # (256, 3): the normalised value of every uint8 level per channel; a lookup is ~8x faster than
        # converting and normalising the batch in float
        levels = np.arange(256, dtype=np.float32)[:, None] / 255
        self.lut = ((levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (S, S, 3) uint8, rounded like torchvision's uint8 resize."""
        h, w = rgb.shape[:2]
        if h <= self.size and w <= self.size:  # enlarging: the filter is plain bilinear, as in OpenCV
            return cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        rows, cols = _resize_weights(h, self.size), _resize_weights(w, self.size)
        out = np.einsum("sh,hwc,tw->stc", rows, rgb.astype(np.float32), cols, optimize=True)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, 3, S, S) float32."""
        resized = np.stack([self.resize(c) for c in crops])  # (B, S, S, 3)
        out = np.empty((len(crops), 3, self.size, self.size), np.float32)
        for k in range(3):
            out[:, k] = self.lut[:, k][resized[..., k]]
        return out
