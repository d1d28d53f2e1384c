"""slice_scores and volume_dice against hand-computed values, including the empty-slice rule."""

from __future__ import annotations

import pytest
import torch

from fedfms.evaluation import slice_scores, volume_dice


def masks(*pixel_sets: list[tuple[int, int]], size: int = 4) -> torch.Tensor:
    """(B, 1, size, size) masks, item b with foreground at pixel_sets[b]."""
    out = torch.zeros(len(pixel_sets), 1, size, size)
    for b, pixels in enumerate(pixel_sets):
        for y, x in pixels:
            out[b, 0, y, x] = 1
    return out


SQUARE = [(1, 1), (1, 2), (2, 1), (2, 2)]
SHIFTED = [(1, 2), (1, 3), (2, 2), (2, 3)]  # overlaps SQUARE in 2 of 4 pixels


def test_hand_computed_cases():
    pred = masks(SQUARE, SHIFTED, [], [(0, 0)], [])
    label = masks(SQUARE, SQUARE, [], [], SQUARE)
    dice, iou = slice_scores(pred, label)
    # perfect; 2*2/(4+4) and 2/6; empty/empty; empty label with a prediction; missed label
    torch.testing.assert_close(dice, torch.tensor([1.0, 0.5, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(iou, torch.tensor([1.0, 1 / 3, 1.0, 0.0, 0.0]))


def test_one_hot_excludes_background_and_averages_classes():
    corner = masks([(3, 0)])[0, 0]
    pred_classes = torch.stack([corner, masks(SHIFTED)[0, 0]])  # class 1 exact, class 2 half right
    label_classes = torch.stack([corner, masks(SQUARE)[0, 0]])
    pred = torch.cat([1 - pred_classes.sum(0, keepdim=True), pred_classes])[None]
    label = torch.cat([1 - label_classes.sum(0, keepdim=True), label_classes])[None]
    dice, iou = slice_scores(pred, label)
    torch.testing.assert_close(dice, torch.tensor([(1.0 + 0.5) / 2]))
    torch.testing.assert_close(iou, torch.tensor([(1.0 + 1 / 3) / 2]))


def test_rejects_probabilities_and_shape_mismatch():
    with pytest.raises(ValueError, match="binary"):
        slice_scores(torch.full((1, 1, 4, 4), 0.7), masks(SQUARE))
    with pytest.raises(ValueError, match="B, C, H, W"):
        slice_scores(masks(SQUARE), masks(SQUARE, size=5))


def test_volume_dice_pools_voxels_and_applies_empty_rule():
    label = torch.zeros(3, 4, 4, dtype=torch.bool)
    label[0, :2, :2] = True  # 4 voxels
    label[1, :2, :] = True  # 8 voxels
    pred = torch.zeros_like(label)
    pred[1, :2, :] = True  # finds the 8, misses the 4
    assert volume_dice(pred, label) == pytest.approx(2 * 8 / (8 + 12))
    empty = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert volume_dice(empty, empty) == 1.0
    assert volume_dice(label[:2], empty) == 0.0
