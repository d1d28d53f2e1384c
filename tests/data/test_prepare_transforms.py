"""The preprocessing chain of ``fedfms prepare`` against hand-computed values."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from fedfms.data.layouts import CaseRecord
from fedfms.data.prepare import PrepareOptions, SiteStats, slice_transform, split_cases, volume_transform


def _case(values: np.ndarray, label: np.ndarray | None = None) -> dict:
    affine = torch.eye(4)
    label = np.zeros_like(values) if label is None else label
    return {"image": MetaTensor(torch.as_tensor(values, dtype=torch.float32), affine=affine),
            "label": MetaTensor(torch.as_tensor(label, dtype=torch.float32), affine=affine)}


def test_default_clip_is_volume_minimum_to_99th_percentile():
    values = np.arange(100, dtype=np.float32).reshape(5, 5, 4)  # 0..99: p99 = 98.01 (linear)
    image = volume_transform(PrepareOptions())(_case(values))["image"]
    assert image.shape == (1, 5, 5, 4)
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    flat = image.numpy().ravel()
    np.testing.assert_allclose(flat[values.ravel() == 49], 49 / 98.01, rtol=1e-6)
    assert (flat[values.ravel() >= 98.01] == 1.0).all()


def test_nnunet_style_percentiles():
    values = np.arange(100, dtype=np.float32).reshape(5, 5, 4)  # p0.5 = 0.495, p99.5 = 98.505
    image = volume_transform(PrepareOptions(lower_percentile=0.5, upper_percentile=99.5))(_case(values))["image"]
    flat = image.numpy().ravel()
    np.testing.assert_allclose(flat[values.ravel() == 50], (50 - 0.495) / (98.505 - 0.495), rtol=1e-6)
    assert flat[values.ravel() == 0] == 0.0 and flat[values.ravel() == 99] == 1.0


def test_masks_above_one_become_one_unless_multi_class():
    label = np.zeros((4, 4, 2), np.float32)
    label[0, 0, 0], label[1, 1, 1], label[2, 2, 0] = 1, 2, 255
    merged = volume_transform(PrepareOptions())(_case(np.ones((4, 4, 2)), label))["label"]
    assert sorted(np.unique(merged.numpy()).tolist()) == [0, 1] and merged.sum() == 3
    kept = volume_transform(PrepareOptions(multi_class=True, num_classes=256))(_case(np.ones((4, 4, 2)), label))["label"]
    assert sorted(np.unique(kept.numpy()).tolist()) == [0, 1, 2, 255]


def test_orientation_makes_slices_axial():
    """An LPS volume is flipped in-plane to RAS; the slice axis stays last."""
    values = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    case = _case(values)
    for key in case:
        case[key].affine = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    image = volume_transform(PrepareOptions(upper_percentile=100))(case)["image"][0]
    np.testing.assert_allclose(image.numpy(), values[::-1, ::-1, :] / values.max(), rtol=1e-6)


@pytest.mark.parametrize("size,label_size,n", [(1024, 256, 1), (224, 224, 5), (256, None, 3)])
def test_resize_sizes_and_stack_shapes(size, label_size, n):
    options = PrepareOptions(image_size=size, label_size=label_size, num_slices=n)
    volume = {"image": torch.rand(1, 12, 10, 6), "label": (torch.rand(1, 12, 10, 6) > 0.5).float()}
    samples = slice_transform(options)(volume)
    assert len(samples) == 6
    assert samples[0]["image"].shape == (n, size, size)
    assert samples[0]["label"].shape == (1, label_size or size, label_size or size)
    assert set(np.unique(samples[3]["label"].numpy())) <= {0.0, 1.0}  # nearest keeps labels binary


def test_zscore_uses_site_statistics():
    options = PrepareOptions(zscore=True, image_size=4, label_size=4)
    volume = {"image": torch.full((1, 4, 4, 2), 0.7), "label": torch.zeros(1, 4, 4, 2)}
    samples = slice_transform(options, SiteStats(mean=0.5, std=0.1, voxels=1))(volume)
    np.testing.assert_allclose(samples[0]["image"].numpy(), 2.0, rtol=1e-5)
    with pytest.raises(ValueError, match="statistics"):
        slice_transform(options)


def test_split_is_by_case_seeded_and_keeps_training():
    records = [CaseRecord(site, f"Case{i:02d}", None, None) for site in ("A", "B") for i in range(10)]
    split = split_cases(records, PrepareOptions(seed=3))
    assert split == split_cases(records, PrepareOptions(seed=3))
    assert split != split_cases(records, PrepareOptions(seed=4))
    for site in ("A", "B"):
        counts = {s: sum(1 for (st, _), v in split.items() if st == site and v == s) for s in ("training", "validation", "testing")}
        assert counts == {"training": 7, "validation": 1, "testing": 2}
    few = split_cases(records[:2], PrepareOptions())
    assert set(few.values()) == {"training"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lower_percentile": 50, "upper_percentile": 40}, "lower < upper"),
        ({"num_slices": 4}, "positive odd"),
        ({"multi_class": True}, "num_classes"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "fractions"),
        ({"on_error": "ignore"}, "on_error"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrepareOptions(**kwargs)
