"""AgeGenderNet: a torchvision ResNet trunk shared by an age-regression head and a gender head.

Plain PyTorch, imported by training and by the service alike. The network always answers in years:
age-target normalisation (if used in training) lives in two buffers, so nothing outside needs to know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from models.artifact import GENDER_CLASSES, WEIGHTS_FILE
from models.errors import UserError

# name -> (constructor, ImageNet weights enum); resnet34 was the original project's best.
BACKBONES = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
}


def check_backbone(name: str) -> str:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return name


def _head(in_features: int, width: int, dropout: float, out: int) -> nn.Sequential:
    # two fully connected layers, as in the original design
    return nn.Sequential(
        nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(width, out)
    )


def _load_trunk(backbone: str, pretrained: bool, weights_path: str | None) -> nn.Module:
    build, weights = BACKBONES[backbone]
    trunk = build(weights=None)
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise UserError(f"backbone weights file {path} does not exist")
        trunk.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    elif pretrained:
        try:
            trunk.load_state_dict(weights.get_state_dict(progress=True))
        except Exception as exc:  # no network, proxy, hub outage: all end the same way for the user
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise UserError(
                f"cannot download ImageNet weights for {backbone} ({type(exc).__name__}); "
                f"train from scratch with --no-pretrained (model.pretrained=false), or fetch {weights.url} "
                f"yourself and put it at {cache} or pass model.weights_path=FILE"
            ) from None
    return trunk


class AgeGenderNet(nn.Module):
    def __init__(
        self,
        backbone: str = "resnet34",
        head_width: int = 256,
        dropout: float = 0.2,
        age_mean: float = 0.0,
        age_std: float = 1.0,
        pretrained: bool = False,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        self.trunk = _load_trunk(check_backbone(backbone), pretrained, weights_path)
        features = self.trunk.fc.in_features  # 512 for resnet18/34, 2048 for resnet50
        self.trunk.fc = nn.Identity()
        self.age_head = _head(features, head_width, dropout, 1)
        self.gender_head = _head(features, head_width, dropout, len(GENDER_CLASSES))
        # the age head learns (age - mean) / std; the buffers travel with the weights
        self.register_buffer("age_mean", torch.tensor(float(age_mean)))
        self.register_buffer("age_std", torch.tensor(float(age_std)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)  # (B, 3, H, W) -> (B, F)
        age = self.age_head(z).squeeze(1) * self.age_std + self.age_mean  # (B,) years
        return age, self.gender_head(z)  # (B,), (B, 2) logits

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> AgeGenderNet:
        """Rebuild the architecture that a stored model describes (weights are loaded separately)."""
        return cls(backbone=meta["backbone"], head_width=meta["head_width"], dropout=meta["dropout"])


def load_network(model_dir: str | Path, meta: dict[str, Any], device: str | torch.device = "cpu") -> AgeGenderNet:
    """A stored model folder -> the network in eval mode on `device`."""
    net = AgeGenderNet.from_metadata(meta)
    net.load_state_dict(torch.load(Path(model_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return net.eval().to(device)


def export_onnx(net: AgeGenderNet, image_size: int, path: str | Path) -> None:
    """(B, 3, S, S) normalised float -> age (B,), logits (B, 2); B is dynamic."""
    example = torch.zeros(1, 3, image_size, image_size)
    batch = {0: "batch"}
    torch.onnx.export(
        net.eval(),
        (example,),
        str(path),
        input_names=["image"],
        output_names=["age", "logits"],
        dynamic_axes={"image": batch, "age": batch, "logits": batch},
        dynamo=False,
    )
