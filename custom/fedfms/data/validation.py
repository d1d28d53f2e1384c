"""Checks that a loaded case is a usable 3D image/label pair, with errors that name the file."""

from __future__ import annotations

import torch

from fedfms.data.layouts import CaseRecord
from fedfms.errors import DataError

# Binary masks may be stored as 0/1, 0/255 or with zone labels 0/1/2: all > 0 become foreground.
BINARY_LABEL_MAX = 255


def check_case(record: CaseRecord, image: torch.Tensor, label: torch.Tensor | None, num_classes: int | None = None) -> None:
    """Raise :class:`DataError` naming the file if the case cannot be prepared.

    Args:
        record: where the case came from (used to name files in errors).
        image: the image as loaded, without a channel axis for 3D files; (H, W, D, C) for multi-channel ones.
        label: the label as loaded, or None when no label file was found.
        num_classes: with multi-class labels, the number of classes (values 0..num_classes-1 are valid);
            None for binary masks, where any value in 1..255 is foreground.
    """
    if label is None:
        raise DataError(record.image, "no label file found for this image")
    _check_image_rank(record, image)
    if tuple(image.shape[:3]) != tuple(label.shape):
        raise DataError(
            record.label, f"label shape {tuple(label.shape)} does not match image shape {tuple(image.shape[:3])} of {record.image}"
        )
    _check_finite(record, image)
    _check_label_values(record, label, num_classes)


def _check_image_rank(record: CaseRecord, image: torch.Tensor) -> None:
    allowed = (3, 4) if record.channel is not None else (3,)
    if image.ndim not in allowed:
        hint = " (multi-channel images are read with --layout msd)" if image.ndim == 4 else ""
        raise DataError(record.image, f"is {image.ndim}D with shape {tuple(image.shape)}, expected a 3D volume{hint}")


def _check_finite(record: CaseRecord, image: torch.Tensor) -> None:
    if image.is_floating_point():
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            nan = int(torch.isnan(image).sum())
            raise DataError(record.image, f"has {bad} non-finite voxels ({nan} NaN, {bad - nan} infinite)")


def _check_label_values(record: CaseRecord, label: torch.Tensor, num_classes: int | None) -> None:
    if label.ndim != 3:
        raise DataError(record.label, f"is {label.ndim}D with shape {tuple(label.shape)}, expected a 3D label volume")
    values = label.double()
    if torch.isnan(values).any():
        raise DataError(record.label, "label has NaN voxels")
    if (values != values.round()).any():
        raise DataError(record.label, "label values out of range: non-integer values found (is this an image, not a mask?)")
    low, high = float(values.min()), float(values.max())
    top = BINARY_LABEL_MAX if num_classes is None else num_classes - 1
    if low < 0 or high > top:
        kind = "binary mask" if num_classes is None else f"{num_classes}-class label"
        raise DataError(record.label, f"label values out of range: found {low:g}..{high:g}, a {kind} allows 0..{top}")
