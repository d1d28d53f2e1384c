"""Input checks as dictionary transforms, for pipelines that read volumes users hand in (inference)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from fedfms.errors import DataError


class CheckVolumed(MapTransform):
    """Fail with the file's name if a loaded image is not a finite 3D volume.

    Place it right after ``LoadImaged`` (before a channel is added): 2D and 4D images, NaN and
    infinite voxels raise :class:`~fedfms.errors.DataError` instead of surfacing later as a shape
    error deep inside the network.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            source = getattr(image, "meta", {}).get("filename_or_obj", str(key))
            if image.ndim != 3:
                raise DataError(source, f"is {image.ndim}D with shape {tuple(image.shape)}, expected a 3D volume")
            if image.is_floating_point() and not torch.isfinite(image).all():
                raise DataError(source, f"has {int((~torch.isfinite(image)).sum())} NaN or infinite voxels")
        return d
