import pytest
import torch
from monai.transforms import Resized

from fedfms.transforms import DepthToChanneld, SelectChanneld, SliceStacksd, stack_indices


def test_stack_indices_replicate_edges():
    expected = [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]
    assert stack_indices(4, 5).tolist() == expected
    assert stack_indices(3, 3).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]
    assert stack_indices(3, 1).tolist() == [[0], [1], [2]]


@pytest.mark.parametrize("n", [0, 2, 4, -1])
def test_stack_size_must_be_positive_odd(n):
    with pytest.raises(ValueError, match="positive odd"):
        stack_indices(5, n)


def _volume(depth=4, size=3):
    """(D, H, W) volume whose slice k is filled with the value k."""
    return torch.arange(depth, dtype=torch.float32)[:, None, None].expand(depth, size, size).clone()


def test_slice_stacks_centre_label():
    label = torch.zeros(4, 3, 3)
    label[2, 1, 1] = 1
    samples = SliceStacksd(["image", "label"], num_slices=5)({"image": _volume(), "label": label, "case": "c"})
    assert [s["slice"] for s in samples] == [0, 1, 2, 3]
    assert samples[0]["image"][:, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert samples[3]["image"][:, 0, 0].tolist() == [1, 2, 3, 3, 3]
    assert samples[2]["label"].shape == (1, 3, 3) and samples[2]["label"].sum() == 1
    assert samples[1]["label"].sum() == 0
    assert all(s["case"] == "c" for s in samples)


def test_slice_stacks_all_labels_and_drop_empty():
    label = torch.zeros(4, 3, 3)
    label[1] = 1
    transform = SliceStacksd(["image", "label"], num_slices=3, all_label_slices=True, keep_empty=False)
    samples = transform({"image": _volume(), "label": label})
    assert [s["slice"] for s in samples] == [1]
    assert samples[0]["label"][:, 0, 0].tolist() == [0, 1, 0]
    assert samples[0]["image"][:, 0, 0].tolist() == [0, 1, 2]


def test_slice_stacks_reject_mismatched_depth():
    with pytest.raises(ValueError, match="different depths"):
        SliceStacksd(["image", "label"], num_slices=3)({"image": _volume(4), "label": torch.zeros(5, 3, 3)})


def test_depth_to_channel_then_resize_equals_per_slice_bilinear():
    volume = torch.rand(1, 7, 9, 5)
    d = DepthToChanneld("image")({"image": volume})
    assert d["image"].shape == (5, 7, 9)
    assert torch.equal(d["image"][2], volume[0, :, :, 2])
    resized = Resized("image", spatial_size=(16, 12), mode="bilinear")(d)["image"]
    one_by_one = [
        torch.nn.functional.interpolate(volume[None, :, :, :, k], size=(16, 12), mode="bilinear", align_corners=False)[0, 0]
        for k in range(5)
    ]
    assert resized.shape == (5, 16, 12)
    assert torch.equal(torch.as_tensor(resized), torch.stack(one_by_one))


def test_depth_to_channel_needs_single_channel():
    with pytest.raises(ValueError, match="single-channel"):
        DepthToChanneld("image")({"image": torch.zeros(2, 3, 3, 3)})


def test_select_channel():
    image = torch.stack([torch.zeros(2, 2, 2), torch.ones(2, 2, 2)])
    assert SelectChanneld("image", 1)({"image": image})["image"].shape == (1, 2, 2, 2)
    assert SelectChanneld("image", 1)({"image": image})["image"].min() == 1
    with pytest.raises(ValueError, match="channel 2"):
        SelectChanneld("image", 2)({"image": image})


@pytest.mark.parametrize("n", [1, 3, 5])
def test_slice_stacks_equal_gather_by_stack_indices(n):
    volume = torch.rand(6, 4, 5)
    samples = SliceStacksd(["image"], num_slices=n, label_key=None)({"image": volume})
    for k, sample in enumerate(samples):
        assert torch.equal(sample["image"], volume[stack_indices(6, n)[k]])
        assert sample["image"].is_contiguous()
