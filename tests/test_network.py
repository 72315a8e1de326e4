"""The network and the loss: shapes per backbone, weights actually applied, clear errors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from devtools.photos import astronaut
from models.errors import UserError
from models.network import BACKBONES, AgeGenderNet
from models.presets import IMAGENET_STD, ArrayPreset, eval_preset, normalize
from training.augment import Augment
from training.data import decode_faces
from training.module import AgeGenderModule


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_output_shapes(backbone: str) -> None:
    net = AgeGenderNet(backbone, head_width=32, age_mean=30.0, age_std=10.0).eval()
    with torch.inference_mode():
        age, logits = net(torch.randn(3, 3, 64, 64))
    assert age.shape == (3,) and logits.shape == (3, 2)
    # the age head is a 2-layer MLP whose output is mapped back to years by the stored statistics
    assert [type(m).__name__ for m in net.age_head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert net.age_mean.item() == 30.0 and net.age_std.item() == 10.0


def test_distribution_head_answers_expected_years() -> None:
    net = AgeGenderNet("resnet18", head_width=32, age_head="distribution").eval()
    with torch.inference_mode():
        age_logits, logits = net(torch.randn(3, 3, 64, 64))
        certain = torch.full((3, 117), -1e4)
        certain[[0, 1, 2], [0, 30, 116]] = 0.0  # all the probability on one year each
        halves = torch.full((1, 117), -1e4)
        halves[0, [20, 40]] = 0.0  # half on 20, half on 40
    assert age_logits.shape == (3, 117) and logits.shape == (3, 2)  # one logit per year 0..116
    assert net.years(certain).tolist() == [0.0, 30.0, 116.0]
    assert net.years(halves).item() == pytest.approx(30.0)  # the expectation, not the most likely year
    with pytest.raises(UserError, match="unknown age head 'ordinal'; choose from regression, distribution"):
        AgeGenderNet("resnet18", age_head="ordinal")


def test_unknown_backbone_names_choices() -> None:
    with pytest.raises(UserError, match="unknown backbone 'resnet35'; choose from resnet18, resnet34, resnet50"):
        AgeGenderNet("resnet35")


def test_local_backbone_weights(tmp_path: Path) -> None:
    donor = AgeGenderNet("resnet18")
    state = {k.removeprefix("trunk."): v for k, v in donor.state_dict().items() if k.startswith("trunk.")}
    state |= {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "resnet18.pth")
    net = AgeGenderNet("resnet18", weights_path=str(tmp_path / "resnet18.pth"))
    assert torch.equal(net.trunk.conv1.weight, donor.trunk.conv1.weight)
    with pytest.raises(UserError, match="does not exist"):
        AgeGenderNet("resnet18", weights_path=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize(("w_age", "w_gender"), [(0.1, 0.99), (1.0, 0.0), (0.0, 2.0)])
def test_loss_weights_are_applied(w_age: float, w_gender: float) -> None:
    module = AgeGenderModule("resnet18", pretrained=False, age_weight=w_age, gender_weight=w_gender, age_loss="mse")
    age, logits = torch.tensor([20.0, 50.0]), torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    true_age, true_gender = torch.tensor([25.0, 40.0]), torch.tensor([0, 1])
    loss, loss_age, loss_gender = module.losses(age, logits, true_age, true_gender)
    assert loss_age == pytest.approx((25 + 100) / 2)
    assert loss_gender == pytest.approx(F.cross_entropy(logits, true_gender).item())
    assert loss == pytest.approx(w_age * loss_age.item() + w_gender * loss_gender.item())


def test_normalised_age_loss_is_in_standard_deviations() -> None:
    module = AgeGenderModule("resnet18", pretrained=False, normalize_age=True, age_mean=30, age_std=10, age_loss="l1")
    _, loss_age, _ = module.losses(torch.tensor([40.0]), torch.zeros(1, 2), torch.tensor([20.0]), torch.tensor([0]))
    assert loss_age == pytest.approx(2.0)


def test_distribution_loss_is_soft_label_cross_entropy() -> None:
    """Cross-entropy against a Gaussian of age_sigma years around the true age, plus age_l1_weight x L1 of
    the expected age in standard deviations: lowest for logits that are that Gaussian's log."""
    module = AgeGenderModule("resnet18", pretrained=False, age_head="distribution", age_sigma=2.0)
    years = torch.arange(117.0)
    target = torch.exp(-0.5 * ((years - 30) / 2.0) ** 2)
    target = target / target.sum()
    loss_at = {}
    for centre in (30, 35):
        logits = (-0.5 * ((years - centre) / 2.0) ** 2)[None]
        loss_at[centre] = module.age_terms(logits, torch.tensor([30.0])).item()
    entropy = -torch.special.xlogy(target, target).sum().item()
    assert loss_at[30] == pytest.approx(entropy, abs=1e-4) and loss_at[35] > loss_at[30] + 1
    with_l1 = AgeGenderModule("resnet18", pretrained=False, age_head="distribution", age_l1_weight=0.5)
    l1_term = with_l1.age_terms((-0.5 * ((years - 35) / 2.0) ** 2)[None], torch.tensor([30.0])).item() - loss_at[35]
    assert l1_term == pytest.approx(0.5 * 5, abs=1e-3)  # expected age 35 vs 30; age_std 1 without normalize_age


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"age_weight": -0.1}, "model.age_weight must be >= 0"),
        ({"age_sigma": 0.0}, "need model.age_sigma > 0"),
        ({"age_loss": "huber"}, "unknown age_loss 'huber'; choose from mse, l1, smooth_l1"),
        ({"age_weight": 0.0, "gender_weight": 0.0}, "cannot both be 0"),
    ],
)
def test_module_rejects_bad_hyperparameters(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        AgeGenderModule("resnet18", pretrained=False, **kwargs)


def test_training_faces_are_the_served_faces() -> None:
    """Training decodes chips with the service's code: normalised, they are what the service feeds the network."""
    chip = np.asarray(astronaut().resize((200, 200)))
    path = Path(tempfile.mkdtemp()) / "chip.png"
    Image.fromarray(chip).save(path)
    size = 64
    trained = normalize(decode_faces([str(path)], size)).numpy()
    served = ArrayPreset(size)(chip[None])
    assert trained.shape == served.shape == (1, 3, size, size)
    assert np.abs(trained - served).max() < 1e-5


def test_augment_keeps_shape_and_range_and_does_nothing_when_off() -> None:
    x = torch.rand(8, 3, 64, 64)
    out = Augment()(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    off = Augment(scale=0, shift=0, rotate=0, flip=0, color=0, gray=0, lowres=0)
    assert torch.allclose(off(x), x, atol=1e-5)  # identity resampling at pixel centres
    mirrored = Augment(scale=0, shift=0, rotate=0, flip=1, color=0, gray=0, lowres=0)(x)
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-5)
    with pytest.raises(UserError, match="unknown key data.augment.zoom; choose from scale, shift"):
        Augment.from_config({"zoom": 0.1})


@pytest.mark.parametrize("size", [64, 200, 224])  # shrinking, same size, enlarging a 200x200 crop
def test_serving_preset_equals_the_training_eval_preset(size: int) -> None:
    """The service preprocesses in numpy (no torch in the CPU image); it must feed the network what
    evaluation fed it, up to one uint8 level of rounding in the resize."""
    crops = np.random.default_rng(size).integers(0, 256, (3, 200, 200, 3), dtype=np.uint8)
    served = ArrayPreset(size)(crops)
    trained = eval_preset(size)(torch.from_numpy(crops).permute(0, 3, 1, 2)).numpy()
    assert served.shape == trained.shape == (3, 3, size, size) and served.dtype == np.float32
    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-5
    assert np.abs(served - trained).max() <= one_level
    assert np.abs(served - trained).mean() < 0.3 * one_level  # most values agree exactly
