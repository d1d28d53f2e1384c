"""Dice and IoU of binary masks, computed by MONAI with the papers' rule for empty slices.

Both scores come from ``monai.metrics.compute_dice`` / ``compute_iou`` with ``ignore_empty=False``.
In MONAI 1.6 that means (``DiceHelper.compute_channel`` and the last line of ``compute_iou``): an
item whose label is empty scores 1 when its prediction is empty too and 0 when it is not. Prostate
volumes have many slices without gland and the papers keep them; MONAI's default
(``ignore_empty=True``) would turn them into NaN and so hide false positives outside the gland.
"""

from __future__ import annotations

import torch
from monai.metrics import compute_dice, compute_iou


def _binary(mask: torch.Tensor, name: str) -> torch.Tensor:
    """``mask`` as 0/1 floats; probabilities passed by mistake would otherwise be scored silently."""
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name} must be a binary mask (bool or 0/1); threshold probabilities first")
    return mask.float()


def slice_scores(pred: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU of every item of a batch of 2D masks, each of shape (B,).

    Args:
        pred: (B, C, H, W) binary prediction.
        label: (B, C, H, W) binary label. ``C == 1``: the channel is the one foreground class.
            ``C > 1``: one-hot with background first; the background is excluded and the item's
            score is the mean over the foreground classes.

    An item with an empty label scores Dice 1 and IoU 1 if its prediction is empty as well, and 0
    if the prediction has any foreground (see the module docstring).
    """
    if pred.ndim != 4 or pred.shape != label.shape:
        raise ValueError(f"pred and label must both be (B, C, H, W), got {tuple(pred.shape)} and {tuple(label.shape)}")
    pred, label = _binary(pred, "pred"), _binary(label, "label")
    include_background = pred.shape[1] == 1  # a single channel is the foreground itself
    dice = compute_dice(pred, label, include_background=include_background, ignore_empty=False)
    iou = compute_iou(pred, label, include_background=include_background, ignore_empty=False)
    return dice.mean(dim=1), iou.mean(dim=1)


def volume_dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """3D Dice of one (D, H, W) binary volume: all voxels pooled, not the mean of its slices' Dice.

    Same empty rule as :func:`slice_scores`: an empty label volume scores 1 with an empty
    prediction and 0 otherwise.
    """
    if pred.ndim != 3 or pred.shape != label.shape:
        raise ValueError(f"pred and label must both be (D, H, W), got {tuple(pred.shape)} and {tuple(label.shape)}")
    pred, label = _binary(pred, "pred"), _binary(label, "label")
    return float(compute_dice(pred[None, None], label[None, None], ignore_empty=False))
