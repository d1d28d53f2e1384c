"""Compactly stored images are read back at their prepared size; anything else passes unchanged."""

import json
import os

import numpy as np
import torch
from monai.transforms import EnsureChannelFirstd, LoadImaged, Resize

from fedfms.transforms.stored import RestorePreparedSized, load_prepared_image, prepared_image_size


def _sample(root, size, shape=(3, 10, 12)):
    path = root / "images" / "A" / "c_000.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.random.default_rng(0).random(shape).astype(np.float32))
    if size:
        (root / "prepare.json").write_text(json.dumps({"options": {"image_size": size}}))
    return path


def _load(path):
    data = LoadImaged("image", reader="NumpyReader", image_only=True)({"image": str(path)})
    return RestorePreparedSized("image")(EnsureChannelFirstd("image", channel_dim=0)(data))["image"]


def test_a_compact_image_is_resized_to_the_recorded_size_as_prepare_would(tmp_path):
    path = _sample(tmp_path, 32)
    expected = Resize((32, 32), mode="bilinear")(torch.from_numpy(np.load(path)))
    assert prepared_image_size(path) == 32
    assert torch.equal(_load(path).as_tensor(), expected.as_tensor())
    assert np.array_equal(load_prepared_image(path), expected.numpy())


def test_an_image_outside_a_prepared_folder_or_already_at_size_passes_unchanged(tmp_path):
    loose = _sample(tmp_path / "loose", None)
    at_size = _sample(tmp_path / "at_size", 8, shape=(1, 8, 8))
    for path in (loose, at_size):
        assert torch.equal(_load(path).as_tensor(), torch.from_numpy(np.load(path)))
    assert prepared_image_size(loose) is None


def test_a_new_preparation_is_noticed(tmp_path):
    path = _sample(tmp_path, 16)
    assert prepared_image_size(path) == 16
    record = tmp_path / "prepare.json"
    record.write_text(json.dumps({"options": {"image_size": 24}}))
    stat = record.stat()
    os.utime(record, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert prepared_image_size(path) == 24
