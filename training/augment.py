"""Training augmentation on whole batches: (B, 3, S, S) float in [0, 1] -> the same, parameters drawn per image.

The service does not see UTKFace's chips: it sees faces found by a detector and aligned on five landmarks
(models/faces.py), whose framing wobbles by a few percent in scale, a few pixels in position and a few
degrees, in photos that are lit differently, smaller (so blurrier once enlarged to the crop) and
recompressed. Each op imitates one of these around the chip framing. On a batch in the training process,
geometry and colour cost far less than the network (benchmarks/train_speed.py), and no loader processes
compete with it for the cores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from models.errors import UserError

# ITU-R BT.601 luma weights (what torchvision's rgb_to_grayscale uses)
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Augment:
    scale: float = 0.1  # zoom drawn log-uniformly in [1/(1+scale), 1+scale]
    shift: float = 0.05  # offset on each axis, as a fraction of the side, uniform in [-shift, shift]
    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    flip: float = 0.5  # probability of a mirror image
    color: float = 0.25  # brightness, contrast and saturation factors, each uniform in [1-color, 1+color]
    gray: float = 0.05  # probability of a black and white photo
    lowres: float = 0.25  # probability of a face seen at lower resolution: down- then up-sampled
    lowres_min: float = 0.3  # the smallest such resolution, as a fraction of the input size

    @classmethod
    def from_config(cls, options: dict | None) -> Augment:
        options = options or {}
        unknown = set(options) - set(asdict(cls()))
        if unknown:
            allowed = ", ".join(asdict(cls()))
            raise UserError(f"unknown key data.augment.{sorted(unknown)[0]}; choose from {allowed}")
        return cls(**options)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.geometry(x)
        x = self.colour(x)
        return self.resolution(x).clamp_(0, 1)

    def _uniform(self, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.empty(x.shape[0], device=x.device).uniform_(low, high)  # (B,)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Zoom, shift, rotation and mirror in one resampling; borders repeat the edge, as align_crop does."""
        zoom = torch.exp(self._uniform(x, -1, 1) * math.log1p(self.scale))
        angle = self._uniform(x, -1, 1) * math.radians(self.rotate)
        mirror = torch.where(self._uniform(x, 0, 1) < self.flip, -1.0, 1.0)
        # affine_grid's coordinates span [-1, 1]: a side is 2 units; theta maps output to input points
        tx, ty = self._uniform(x, -2, 2) * self.shift, self._uniform(x, -2, 2) * self.shift
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * mirror, -sin, tx], 1), torch.stack([sin * mirror, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, S, S, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def colour(self, x: torch.Tensor) -> torch.Tensor:
        luma = torch.tensor(LUMA, device=x.device)[None, :, None, None]
        factor = lambda: self._uniform(x, 1 - self.color, 1 + self.color)[:, None, None, None]  # noqa: E731
        x = x * factor()  # brightness
        gray = (x * luma).sum(1, keepdim=True)  # (B, 1, S, S)
        mean = gray.mean((2, 3), keepdim=True)
        x = (x - mean) * factor() + mean  # contrast
        gray = (x * luma).sum(1, keepdim=True)
        x = (x - gray) * factor() + gray  # saturation
        mono = (self._uniform(x, 0, 1) < self.gray)[:, None, None, None]
        return torch.where(mono, (x * luma).sum(1, keepdim=True).expand_as(x), x)

    def resolution(self, x: torch.Tensor) -> torch.Tensor:
        """A random part of the batch, down-sampled to one random size and enlarged back."""
        chosen = self._uniform(x, 0, 1) < self.lowres
        if not chosen.any():
            return x
        size = x.shape[-1]
        low = max(8, round(size * float(torch.empty(1).uniform_(self.lowres_min, 1))))
        small = F.interpolate(x[chosen], size=(low, low), mode="bilinear", antialias=True, align_corners=False)
        x = x.clone()
        x[chosen] = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
        return x
