"""SliceInferer: networks whose outputs are known functions of their inputs, so results are checked by hand; AutocastInferer against full precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import Invertd, Orientationd, Resize
from torch import nn

from fedfms.data.prepare import PrepareOptions, slice_transform
from fedfms.inferers import SliceInferer
from fedfms.models import build_model


def identity(x: torch.Tensor) -> torch.Tensor:
    """channels mode, N = 1: the slice itself as a one-channel logit map."""
    return x


def own_slices(x: torch.Tensor) -> torch.Tensor:
    """slices mode: every slice of the stack predicts its own value."""
    return x.reshape(-1, 1, *x.shape[-2:])


def centre_everywhere(x: torch.Tensor) -> torch.Tensor:
    """slices mode: every position of a window predicts the window's centre slice."""
    n = x.shape[1]
    return x[:, n // 2 : n // 2 + 1].repeat_interleave(n, dim=0)


def position(x: torch.Tensor) -> torch.Tensor:
    """slices mode: position j of every window predicts the constant j."""
    k, n = x.shape[:2]
    return torch.arange(n, dtype=x.dtype).repeat(k).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])


def depth_ramp(depth: int, height: int = 8, width: int = 8) -> torch.Tensor:
    """(1, 1, H, W, D) volume whose slice d is constant d."""
    return torch.arange(depth, dtype=torch.float32).expand(1, 1, height, width, depth).clone()


class StackConv(nn.Module):
    """A fixed random 2.5D/2D conv net: channels mode maps N -> 2 channels, slices mode 1 -> 2."""

    def __init__(self, in_channels: int, slices: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.slices = slices
        self.conv = nn.Conv2d(1 if slices else in_channels, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(own_slices(x) if self.slices else x)


def test_channels_identity_same_size_returns_input():
    volume = torch.rand(2, 1, 16, 16, 5)
    out = SliceInferer(16)(volume, identity)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, volume)


def test_channels_identity_resizes_there_and_back_like_monai_resize():
    volume = torch.rand(1, 1, 20, 12, 6)
    out = SliceInferer(16)(volume, identity)
    slices = volume[0, 0].movedim(-1, 0)  # DepthToChanneld
    expected = Resize((20, 12), mode="bilinear")(Resize((16, 16), mode="bilinear")(slices))
    torch.testing.assert_close(out[0, 0], torch.as_tensor(expected).movedim(0, -1))


def test_network_sees_the_training_stacks():
    """The stacks fed to the network are the samples prepare's slice_transform makes from the volume."""
    volume = torch.rand(1, 1, 20, 12, 6)
    seen = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return own_slices(x)

    SliceInferer(16, num_slices=3, input_mode="slices", batch_size=4)(volume, record)
    options = PrepareOptions(image_size=16, label_size=16, num_slices=3)
    samples = slice_transform(options)({"image": volume[0], "label": torch.zeros_like(volume[0])})
    torch.testing.assert_close(torch.cat(seen), torch.stack([torch.as_tensor(s["image"]) for s in samples]))


def test_slices_own_values_average_to_input():
    volume = torch.rand(1, 1, 16, 16, 7)
    out = SliceInferer(16, num_slices=3, input_mode="slices")(volume, own_slices)
    torch.testing.assert_close(out, volume)


def test_slices_average_counts_replicated_edge_positions():
    # N = 3: slice 0 is predicted by positions 0 and 1 of window 0 and position 0 of window 1,
    # slice D-1 by positions 1, 2 of window D-1 and position 2 of window D-2; inner slices by 0, 1, 2.
    depth = 5
    out = SliceInferer(8, num_slices=3, input_mode="slices")(depth_ramp(depth), position)
    expected = torch.tensor([(0 + 1 + 0) / 3, 1, 1, 1, (1 + 2 + 2) / 3])
    torch.testing.assert_close(out[0, 0, 3, 3], expected)


@pytest.mark.parametrize(
    ("num_slices", "expected"),
    [
        # window k predicts k everywhere; slice 0 of N = 3 is covered by windows 0, 0, 1
        (3, [1 / 3, 1, 2, 3, 4, 5, 6 - 1 / 3]),
        # N = 5: slice 0 by windows 0 (x3), 1 (x2), 2; slice 1 by 0, 1, 2, 3; mirrored at the end
        (5, [4 / 6, 6 / 4, 2, 3, 4, 6 - 6 / 4, 6 - 4 / 6]),
    ],
)
def test_slices_average_of_window_centres(num_slices, expected):
    out = SliceInferer(8, num_slices=num_slices, input_mode="slices")(depth_ramp(7), centre_everywhere)
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(expected))


def test_low_resolution_logits_come_back_at_volume_size():
    def quarter(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x[:, 1:2], 4)  # the centre slice at (k, 1, S/4, S/4)

    out = SliceInferer(16, num_slices=3)(depth_ramp(4, 20, 12), quarter)
    assert out.shape == (1, 1, 20, 12, 4)
    torch.testing.assert_close(out, depth_ramp(4, 20, 12))


@pytest.mark.parametrize("mode", ["channels", "slices"])
def test_batch_size_does_not_change_the_result(mode):
    network = StackConv(3, slices=mode == "slices")
    volume = torch.rand(2, 1, 10, 14, 7)
    with torch.no_grad():
        small = SliceInferer(16, num_slices=3, input_mode=mode, batch_size=2)(volume, network)
        whole = SliceInferer(16, num_slices=3, input_mode=mode, batch_size=64)(volume, network)
    assert small.shape == (2, 2, 10, 14, 7)
    torch.testing.assert_close(small, whole)


def test_runs_under_the_callers_grad_mode():
    network = StackConv(1)
    volume = torch.rand(1, 1, 8, 8, 3)
    assert SliceInferer(8)(volume, network).requires_grad
    with torch.no_grad():
        assert not SliceInferer(8)(volume, network).requires_grad


@pytest.mark.parametrize(
    ("model", "decoder", "mode", "num_slices", "channels"),
    [("sam", "full", "channels", 1, 1), ("flapsam", "flap", "slices", 3, 2)],
)
def test_tiny_sam_models(model, decoder, mode, num_slices, channels):
    network = build_model(model, decoder, "tiny", 64, num_classes=1, input_mode=mode).eval()
    with torch.no_grad():
        out = SliceInferer(64, num_slices=num_slices, input_mode=mode, batch_size=4)(torch.rand(1, 1, 40, 48, 7), network)
    assert out.shape == (1, channels, 40, 48, 7)
    assert torch.isfinite(out).all()


def test_invertd_maps_the_prediction_back_to_the_original_orientation():
    """As in an inference bundle: reorient, collate, infer, decollate, Invertd."""
    affine = torch.diag(torch.tensor([-0.8, -0.8, 3.0, 1.0], dtype=torch.float64))  # LPS
    original = torch.rand(1, 16, 16, 6)
    preprocess = Orientationd("image", axcodes="RAS", labels=None)
    batch = list_data_collate([preprocess({"image": MetaTensor(original, affine=affine, meta={"filename_or_obj": "case.nii.gz"})})])
    batch["pred"] = SliceInferer(16)(batch["image"], identity)
    assert isinstance(batch["pred"], MetaTensor)
    item = Invertd("pred", preprocess, orig_keys="image")(decollate_batch(batch)[0])
    torch.testing.assert_close(item["pred"].affine, affine)
    assert item["pred"].meta["filename_or_obj"] == "case.nii.gz"
    torch.testing.assert_close(item["pred"].as_tensor(), original)


def test_plain_metatensor_keeps_affine():
    affine = np.diag([-0.8, -0.8, 3.0, 1.0])
    out = SliceInferer(8)(MetaTensor(torch.rand(1, 1, 8, 8, 3), affine=affine), identity)
    assert isinstance(out, MetaTensor)
    np.testing.assert_allclose(out.affine.numpy(), affine)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_slices": 2}, "odd"),
        ({"input_mode": "depth"}, "unknown input mode"),
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SliceInferer(**{"image_size": 8, **kwargs})


@pytest.mark.parametrize("shape", [(1, 8, 8, 3), (1, 2, 8, 8, 3)])
def test_bad_input(shape):
    with pytest.raises(ValueError, match="single-channel volumes"):
        SliceInferer(8)(torch.rand(shape), identity)


def test_network_output_must_match_the_mode():
    volume = torch.rand(1, 1, 8, 8, 3)
    with pytest.raises(ValueError, match="'slices' mode the network must return 9 predictions"):
        SliceInferer(8, num_slices=3, input_mode="slices")(volume, lambda x: x[:, :1])
    with pytest.raises(ValueError, match="'channels' mode the network must return 3 predictions"):
        SliceInferer(8, num_slices=3)(volume, own_slices)


def test_autocast_inferer_gives_float32_logits_close_to_full_precision():
    from fedfms.inferers import AutocastInferer, training_inferer
    from fedfms.models import build_model

    torch.manual_seed(0)
    network = build_model("flapsam", "flap", size="tiny", image_size=32, num_classes=1).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        full, half = network(x), AutocastInferer()(x, network)
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert not torch.equal(half, full)  # bf16 kernels did run
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05 * full.abs().max().item())
    assert isinstance(training_inferer(True, "cpu"), AutocastInferer)
    assert not isinstance(training_inferer(True, "cuda"), AutocastInferer)  # on GPUs MONAI's own amp applies
    assert not isinstance(training_inferer(False, "cpu"), AutocastInferer)
    with pytest.raises(ValueError, match="unknown autocast dtype 'int8'"):
        AutocastInferer("int8")
