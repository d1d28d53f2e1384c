"""The U-Net family: shapes in both input modes, gradient flow, nnU-Net plans, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfms.models.unet import UNET_NAMES, build_unet, nnunet_plan

SIZE = 32  # small enough for CPU, deep enough for FedU-Net's four stride-2 levels


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, mode: str, num_slices: int, out_channels: int = 2) -> nn.Module:
    in_channels = num_slices if mode == "channels" else 1
    return build_unet(
        name, in_channels, out_channels, image_size=SIZE, input_mode=mode, num_slices=num_slices
    )


@pytest.mark.parametrize("num_slices", [1, 5])
@pytest.mark.parametrize("mode", ["channels", "slices"])
@pytest.mark.parametrize("name", UNET_NAMES)
def test_output_is_logits_of_the_expected_shape(name, mode, num_slices):
    torch.manual_seed(0)
    model = build(name, mode, num_slices).eval()
    batch = 2
    with torch.no_grad():
        out = model(torch.rand(batch, num_slices, SIZE, SIZE))
    items = batch if mode == "channels" else batch * num_slices
    assert out.shape == (items, 2, SIZE, SIZE)
    assert torch.isfinite(out).all()
    assert out.min() < 0  # logits, not probabilities


@pytest.mark.parametrize("name", UNET_NAMES)
def test_gradients_reach_the_first_convolution(name):
    torch.manual_seed(0)
    model = build(name, "slices", num_slices=3, out_channels=1).train()
    x = torch.rand(2, 3, SIZE, SIZE)
    target = (torch.rand(6, 1, SIZE, SIZE) > 0.5).float()
    nn.functional.binary_cross_entropy_with_logits(model(x), target).backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("image_size", "kwargs", "strides", "filters"),
    [
        (256, {}, [1, 2, 2, 2, 2, 2, 2], [32, 64, 128, 256, 512, 512, 512]),  # 256 / 2**6 = 4
        (224, {}, [1, 2, 2, 2, 2, 2], [32, 64, 128, 256, 512, 512]),  # 224 / 2**5 = 7, 3.5 next
        (64, {}, [1, 2, 2, 2, 2], [32, 64, 128, 256, 512]),  # 64 / 2**4 = 4
        (32, {}, [1, 2, 2, 2], [32, 64, 128, 256]),
        (1024, {}, [1, 2, 2, 2, 2, 2, 2], [32, 64, 128, 256, 512, 512, 512]),  # capped at 6
        (256, {"min_feature_size": 8}, [1, 2, 2, 2, 2, 2], [32, 64, 128, 256, 512, 512]),
        (256, {"max_levels": 3}, [1, 2, 2, 2], [32, 64, 128, 256]),
    ],
)
def test_nnunet_plan_hand_computed(image_size, kwargs, strides, filters):
    plan = nnunet_plan(image_size, **kwargs)
    assert plan.strides == strides
    assert plan.filters == filters
    assert plan.kernels == [3] * len(strides)


@pytest.mark.parametrize(("image_size", "total_stride"), [(100, 16), (200, 32)])
def test_nnunet_plan_rejects_sizes_not_divisible_by_the_total_stride(image_size, total_stride):
    with pytest.raises(ValueError, match=f"image_size {image_size} .*total stride {total_stride}"):
        nnunet_plan(image_size)


def test_nnunet_plan_rejects_sizes_too_small_for_three_levels():
    with pytest.raises(ValueError, match="image_size 8 is too small"):
        nnunet_plan(8)


def test_dynunet_follows_the_plan_and_needs_an_image_size():
    network = build_unet("dynunet", image_size=64).network
    assert list(network.strides) == nnunet_plan(64).strides
    assert not network.deep_supervision
    with pytest.raises(ValueError, match="dynunet .*image_size"):
        build_unet("dynunet")
    with pytest.raises(ValueError, match="image_size 100"):
        build_unet("dynunet", image_size=100)


def test_fedunet_checks_a_given_image_size_against_its_total_stride():
    with pytest.raises(ValueError, match="image_size 40 .*total stride 16 of FedU-Net"):
        build_unet("unet", image_size=40)


def test_smlite_is_small():
    smlite = count_parameters(build_unet("smlite"))
    assert smlite < 2_000_000
    assert smlite < count_parameters(build_unet("basicunet")) < count_parameters(build_unet("unet"))


def test_overrides_reach_the_monai_network():
    small = build_unet("unet", channels=(8, 16, 32), strides=(2, 2), norm="instance")
    assert count_parameters(small) < count_parameters(build_unet("smlite"))
    assert small(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet"}, "unknown network 'resnet'; expected one of unet, basicunet, dynunet, smlite"),
        ({"name": "unet", "input_mode": "volume"}, "unknown input mode 'volume'; expected one of channels"),
        ({"name": "unet", "num_slices": 5}, "5 slices of a stack as channels, so in_channels must be 5, got 1"),
        (
            {"name": "unet", "in_channels": 5, "num_slices": 5, "input_mode": "slices"},
            "one-channel image, so in_channels must be 1, got 5",
        ),
        ({"name": "unet", "num_slices": 0, "in_channels": 0}, "num_slices must be at least 1"),
        ({"name": "smlite", "channels": (8, 16)}, r"smlite \(BasicUNet\) has no setting 'channels'; it accepts"),
        ({"name": "unet", "spatial_dims": 3}, "unet: spatial_dims cannot be overridden"),
    ],
)
def test_bad_arguments_raise_helpful_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_unet(**kwargs)
