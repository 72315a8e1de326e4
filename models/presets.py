"""Preprocessing, defined once: training, evaluation and the service all use these presets.

Every face reaches the network the same way: image bytes decoded by `models.images.decode_image`, an
aligned 200x200 crop (`models.pipeline.load_crops` for chips, `models.faces.align_crop` for photos),
`ArrayPreset.resize` to the model's input size, then normalised. Training decodes its chips once with
that same code (training/data.py) and normalises on the batch (`normalize`); the service runs
`ArrayPreset` in numpy (the CPU image has no torch). `eval_preset` is the torchvision spelling of the same
steps, for tensors; tests/test_network.py holds the two equal. torch is imported inside the torch
functions so that importing this module stays cheap.
"""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224  # the network's input side where a config names none: ImageNet's, that of its backbones


def eval_preset(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """torch: (B, 3, H, W) or (3, H, W) uint8 -> resized to (S, S), scaled to [0, 1] and normalised."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """torch: (B, 3, S, S) uint8 or float in [0, 1] -> normalised float32, as the last step of eval_preset."""
    import torch

    if x.dtype == torch.uint8:
        x = x.float() / 255
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


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
