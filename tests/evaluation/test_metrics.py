"""slice_scores, volume_dice and volume_hd95 against hand-computed values, including the empty rules."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fedfms.evaluation import slice_scores, volume_dice, volume_hd95


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


def voxels(*points: tuple[int, int, int], shape: tuple[int, int, int] = (3, 8, 8)) -> torch.Tensor:
    """(D, H, W) bool volume with foreground at ``points``."""
    out = torch.zeros(shape, dtype=torch.bool)
    for point in points:
        out[point] = True
    return out


def test_hd95_units_are_voxels_of_the_grid():
    """Unit spacing: in-plane distances are pixels, depth distances slice-index steps."""
    assert volume_hd95(voxels((1, 2, 2)), voxels((1, 2, 5))) == 3.0  # same slice, 3 pixels apart
    assert volume_hd95(voxels((0, 2, 2)), voxels((2, 2, 2))) == 2.0  # same pixel, 2 slices apart
    assert volume_hd95(voxels((0, 0, 0)), voxels((1, 1, 1))) == pytest.approx(math.sqrt(3))


def test_hd95_of_a_shifted_square():
    """A 4x4 square moved 2 pixels: a quarter of each edge set is 2 away, a quarter 1 away, half 0.

    16 distances each way, sorted 8 x 0, 4 x 1, 4 x 2: the 95th percentile (position 0.95 * 15 =
    14.25) is 2; every voxel is an edge, the volume being one slice deep.
    """
    label = torch.zeros(1, 10, 10, dtype=torch.bool)
    label[0, 2:6, 2:6] = True
    pred = torch.roll(label, 2, dims=-1)
    assert volume_hd95(pred, label) == 2.0
    assert volume_hd95(label, label) == 0.0


def test_hd95_is_the_95th_percentile_not_the_maximum():
    """19 voxels on a line, found, plus one false positive 10 pixels away: 20 distances pred -> label,
    19 x 0 and 1 x 10; position 0.95 * 19 = 18.05 interpolates 0 + 0.05 * 10 = 0.5 (the maximum is 10)."""
    label = torch.zeros(1, 12, 20, dtype=torch.bool)
    label[0, 0, :19] = True
    pred = label.clone()
    pred[0, 10, 0] = True
    assert volume_hd95(pred, label) == pytest.approx(0.5, abs=1e-5)  # MONAI works in float32


def test_hd95_is_nan_when_label_or_prediction_is_empty():
    """No distance to nothing: NaN (not MONAI's NaN/inf with a warning), whatever Dice says."""
    empty, organ = voxels(), voxels((1, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pred, label in ((organ, empty), (empty, organ), (empty, empty)):
            assert math.isnan(volume_hd95(pred, label))
    assert volume_dice(empty, empty) == 1.0 and volume_dice(organ, empty) == 0.0


def test_hd95_rejects_probabilities_and_2d_masks():
    with pytest.raises(ValueError, match="binary"):
        volume_hd95(torch.full((1, 4, 4), 0.7), voxels((0, 1, 1), shape=(1, 4, 4)))
    with pytest.raises(ValueError, match="D, H, W"):
        volume_hd95(torch.zeros(4, 4), torch.zeros(4, 4))
