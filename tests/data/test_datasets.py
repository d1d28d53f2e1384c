"""BoundedCacheDataset: the same samples as MONAI's Dataset, as many cached as the memory bound allows."""

import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, RandFlipd, Resized

from fedfms.data.datasets import BoundedCacheDataset


def datalist(tmp_path, n: int = 5) -> list[dict]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        image, label = tmp_path / f"image_{i}.npy", tmp_path / f"label_{i}.npy"
        np.save(image, rng.random((5, 32, 32), dtype=np.float32))
        np.save(label, (rng.random((5, 32, 32)) > 0.5).astype(np.float32))
        items.append({"image": str(image), "label": str(label)})
    return items


def transforms(flip: bool = False) -> Compose:
    keys = ["image", "label"]
    steps = [LoadImaged(keys, reader="NumpyReader", image_only=True), EnsureChannelFirstd(keys, channel_dim=0),
             Resized(keys, spatial_size=(16, 16), mode="nearest"), EnsureTyped(keys, dtype=torch.float32, track_meta=False)]
    return Compose(steps + ([RandFlipd(keys, prob=0.5, spatial_axis=0)] if flip else []))


SAMPLE_BYTES = 2 * 5 * 16 * 16 * 4  # image and label after the resize, float32


def test_samples_equal_the_plain_datasets_and_the_bound_sets_how_many_are_cached(tmp_path):
    items = datalist(tmp_path)
    plain = Dataset(items, transforms())
    cached = BoundedCacheDataset(items, transforms(), max_mb=2.5 * SAMPLE_BYTES / 2**20)
    assert cached.sample_bytes == SAMPLE_BYTES and cached.cache_num == 2
    for i in range(len(items)):
        for key in ("image", "label"):
            assert torch.equal(cached[i][key], plain[i][key])
    assert BoundedCacheDataset(items, transforms(), max_mb=1024).cache_num == 5
    assert BoundedCacheDataset(items, transforms(), max_mb=0).cache_num == 0
    with pytest.raises(ValueError, match="dataset cache size must be >= 0 MiB"):
        BoundedCacheDataset(items, transforms(), max_mb=-1)


def test_random_transforms_run_on_top_of_the_cache_as_on_the_plain_dataset(tmp_path):
    items = datalist(tmp_path)
    plain, cached = Dataset(items, transforms(flip=True)), BoundedCacheDataset(items, transforms(flip=True), max_mb=1024)
    plain.transform.set_random_state(seed=7)
    cached.transform.set_random_state(seed=7)
    for _ in range(2):  # two epochs: the cached samples are copies, the flips do not accumulate
        for i in range(len(items)):
            assert torch.equal(cached[i]["image"], plain[i]["image"])
