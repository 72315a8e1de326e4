"""AgeGenderNet: a torchvision ResNet trunk shared by an age head and a gender head.

Plain PyTorch, imported by training and by the service alike. Two age heads:
- regression:   one number, in years; age-target normalisation (if used in training) lives in two
                buffers, so nothing outside needs to know.
- distribution: logits over whole years 0..AGE_RANGE[1] (DLDL / soft labels); the answer is the expected
                age, and the distribution also gives intervals and P(minor) (models/outputs.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from models.artifact import AGE_HEADS, AGE_RANGE, GENDER_CLASSES, WEIGHTS_FILE, ModelMeta
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


def check_age_head(name: str) -> str:
    if name not in AGE_HEADS:
        raise UserError(f"unknown age head {name!r}; choose from {', '.join(AGE_HEADS)}")
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
            ) from exc
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
        age_head: str = "regression",
    ) -> None:
        super().__init__()
        self.trunk = _load_trunk(check_backbone(backbone), pretrained, weights_path)
        fc = self.trunk.fc
        assert isinstance(fc, nn.Linear)  # every torchvision ResNet ends in one
        features = fc.in_features  # 512 for resnet18/34, 2048 for resnet50
        self.trunk.fc = nn.Identity()
        self.distribution = check_age_head(age_head) == "distribution"
        self.age_head = _head(features, head_width, dropout, AGE_RANGE[1] + 1 if self.distribution else 1)
        self.gender_head = _head(features, head_width, dropout, len(GENDER_CLASSES))
        # the age head learns (age - mean) / std; the buffers travel with the weights
        self.register_buffer("age_mean", torch.tensor(float(age_mean)))
        self.register_buffer("age_std", torch.tensor(float(age_std)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> age output, gender logits (B, 2). The age output is (B,) years for regression,
        (B, 117) logits over years 0..116 for the distribution head."""
        z = self.trunk(x)  # (B, F)
        if self.distribution:
            return self.age_head(z), self.gender_head(z)
        return self.age_head(z).squeeze(1) * self.age_std + self.age_mean, self.gender_head(z)

    def years(self, age_out: torch.Tensor) -> torch.Tensor:
        """forward's age output -> (B,) age in years: itself, or the distribution's expected age."""
        if not self.distribution:
            return age_out
        ages = torch.arange(age_out.shape[1], dtype=age_out.dtype, device=age_out.device)
        return age_out.softmax(1) @ ages

    @classmethod
    def from_metadata(cls, meta: ModelMeta) -> AgeGenderNet:
        """Rebuild the architecture that a stored model describes (weights are loaded separately)."""
        return cls(backbone=meta.backbone, head_width=meta.head_width, dropout=meta.dropout, age_head=meta.age_head)


def load_network(model_dir: str | Path, meta: ModelMeta, device: str | torch.device = "cpu") -> AgeGenderNet:
    """A stored model folder -> the network in eval mode on `device`."""
    net = AgeGenderNet.from_metadata(meta)
    net.load_state_dict(torch.load(Path(model_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return net.eval().to(device)


def export_onnx(net: AgeGenderNet, image_size: int, path: str | Path) -> None:
    """(B, 3, S, S) normalised float -> age output (as forward), gender logits (B, 2); B is dynamic."""
    example = torch.zeros(1, 3, image_size, image_size)
    batch = {0: "batch"}
    age = "age_logits" if net.distribution else "age"
    torch.onnx.export(
        net.eval(),
        (example,),
        str(path),
        input_names=["image"],
        output_names=[age, "logits"],
        dynamic_axes={"image": batch, age: batch, "logits": batch},
        dynamo=False,
    )
