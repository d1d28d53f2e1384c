"""Dice, IoU and 95 % Hausdorff distance of binary masks, all computed by MONAI.

Dice and IoU follow the papers' **empty-slice rule**: ``monai.metrics.compute_dice`` /
``compute_iou`` with ``ignore_empty=False``. In MONAI 1.6 that means (``DiceHelper.compute_channel``
and the last line of ``compute_iou``): an item whose label is empty scores 1 when its prediction is
empty too and 0 when it is not. Prostate volumes have many slices without gland and the papers keep
them; MONAI's default (``ignore_empty=True``) would turn them into NaN and so hide false positives
outside the gland. The rule also makes a mean over all slices mix two questions (how well is the
organ outlined? is anything predicted where there is none?), so :mod:`fedfms.evaluation.report`
reports them apart as well: Dice over slices with organ and the false-positive rate on empty slices.

HD95 (:func:`volume_hd95`) is ``monai.metrics.compute_hausdorff_distance(percentile=95)``:
symmetric, Euclidean, between the edges of the two masks, with unit spacing, i.e. in voxels of the
grid it is given (for the report: pixels of the prepared label grid in-plane, one slice index in
depth; not millimetres). It is undefined when the label or the prediction is empty (MONAI returns
NaN or inf there): :func:`volume_hd95` returns NaN for such a volume, and the report leaves it out of
its means and counts it.
"""

from __future__ import annotations

import warnings

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

HD_PERCENTILE = 95


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


def volume_hd95(pred: torch.Tensor, label: torch.Tensor) -> float:
    """95th-percentile Hausdorff distance of one (D, H, W) binary volume, in voxels of that grid.

    The 95th percentile rather than the maximum, so that one stray voxel far from the organ does not
    decide the score (the Dice scores already count it). Distances use unit spacing on all three
    axes: in-plane they are pixels of the given grid, in depth slice-index steps; the prepared
    volumes are not isotropic, so this is not a physical length.

    Returns NaN when ``label`` or ``pred`` has no foreground: a distance between a mask and nothing
    does not exist (MONAI would return NaN or inf and warn). Both empty is a perfect result and a
    missed organ a total failure, but :func:`volume_dice` already tells those apart; callers leave
    NaN volumes out of their means and say how many they left out.
    """
    if pred.ndim != 3 or pred.shape != label.shape:
        raise ValueError(f"pred and label must both be (D, H, W), got {tuple(pred.shape)} and {tuple(label.shape)}")
    pred, label = _binary(pred, "pred"), _binary(label, "label")
    if not pred.any() or not label.any():
        return float("nan")
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated always_return_as_numpy argument to get_mask_edges.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        distance = compute_hausdorff_distance(pred[None, None], label[None, None], include_background=True, percentile=HD_PERCENTILE)
    return float(distance)
