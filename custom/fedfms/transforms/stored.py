"""Prepared samples read back at the size ``fedfms prepare`` gave them.

``fedfms prepare --image-store compact`` (the default) writes an image whose in-plane size is
smaller than ``--image-size`` as it is, without the upsampling: the bilinear resize to
``--image-size`` adds no information, only bytes (at 1024 px, 4 MB a slice). The resize is done
here, on load, by the same MONAI ``Resize`` prepare would have run, so the training input is the
same tensor either way. The prepared size is the ``image_size`` recorded in the data folder's
``prepare.json`` (``DATA/images/<site>/<sample>.npy`` -> ``DATA/prepare.json``); an image already
at that size, or one outside a prepared folder, passes unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform, Resize

RECORD = "prepare.json"


def prepared_image_size(sample_path: str | os.PathLike) -> int | None:
    """The ``image_size`` of the preparation that wrote ``sample_path`` (None outside a prepared folder)."""
    record = Path(os.path.normpath(Path(sample_path).parent / ".." / ".." / RECORD))
    try:
        stamp = record.stat().st_mtime_ns
    except OSError:
        return None
    return _recorded_size(record, stamp)


@lru_cache(maxsize=32)
def _recorded_size(record: Path, stamp: int) -> int | None:
    """Read once per version of the record (``stamp``: its mtime), not once per sample."""
    try:
        size = json.loads(record.read_text()).get("options", {}).get("image_size")
    except (OSError, ValueError):
        return None
    return int(size) if size else None


def restore_prepared_size(image: torch.Tensor | np.ndarray, sample_path: str | os.PathLike) -> torch.Tensor | np.ndarray:
    """``image`` (C, H, W), resized as prepare resizes (bilinear) to its data's prepared size if stored smaller."""
    size = prepared_image_size(sample_path)
    if size is None or tuple(image.shape[1:]) == (size, size):
        return image
    return Resize((size, size), mode="bilinear")(image)


def load_prepared_image(path: str | os.PathLike) -> np.ndarray:
    """A prepared image sample (N, S, S) as training sees it, at its prepared size, in float32."""
    image = np.load(path)
    if image.ndim != 3:
        return image  # the callers' own checks name the problem
    return restore_prepared_size(torch.from_numpy(image.astype(np.float32, copy=False)), path).numpy()


class RestorePreparedSized(MapTransform):
    """Bring compactly stored images back to their prepared size (see the module docstring).

    Place it right after ``LoadImaged`` and ``EnsureChannelFirstd``: the file a sample came from is
    read from its ``filename_or_obj`` metadata, which ``LoadImaged`` sets.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = getattr(d[key], "meta", {}).get("filename_or_obj")
            if source:
                d[key] = restore_prepared_size(d[key], source)
        return d
