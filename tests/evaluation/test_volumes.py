"""VolumeAssembler: 3D Dice and HD95 from slices, averaging of overlapping windows, gaps."""

from __future__ import annotations

import math

import pytest
import torch

from fedfms.evaluation import VolumeAssembler
from fedfms.transforms import stack_indices


def label_volume(depth: int = 4, size: int = 4) -> torch.Tensor:
    """(D, H, W) uint8 label: the middle slices hold a 2x2 square, the first and last are empty."""
    label = torch.zeros(depth, size, size, dtype=torch.uint8)
    label[1 : depth - 1, 1:3, 1:3] = 1
    return label


def test_perfect_slices_score_one():
    label = label_volume()
    assembler = VolumeAssembler()
    for k in reversed(range(len(label))):  # order of arrival does not matter
        assembler.add("A", "c0", k, label[k].float(), label[k])
    assert assembler.results() == [{"site": "A", "case": "c0", "dice_3d": 1.0, "hd95_3d": 0.0, "num_slices": 4}]


def test_partial_overlap_hand_computed():
    label = label_volume()  # 2 slices x 4 voxels = 8
    prob = torch.zeros(4, 4, 4)
    prob[1, 1:3, 1:3] = 0.9  # slice 1: all 4 found
    prob[2, 1:3, 1:2] = 0.8  # slice 2: 2 of 4 found
    prob[3, 0, 0] = 0.7  # a false positive on an empty slice
    prob[0, 0, 0] = 0.5  # not above the threshold
    assembler = VolumeAssembler()
    for k in range(4):
        assembler.add("A", "c0", k, prob[k], label[k][None])
    [row] = assembler.results()
    assert row["dice_3d"] == pytest.approx(2 * 6 / (7 + 8))
    # HD95, all voxels being edges of these thin masks. pred -> label: 6 found voxels at 0 and the
    # false positive (3, 0, 0) at sqrt(3) from (2, 1, 1); 7 distances, position 0.95 * 6 = 5.7:
    # 0.7 * sqrt(3). label -> pred: the 2 missed voxels of slice 2 are 1 away: 95th percentile 1.
    assert row["hd95_3d"] == pytest.approx(0.7 * math.sqrt(3))


def test_hd95_of_a_volume_with_an_empty_label_is_nan():
    """Dice scores the false positive of an empty volume 0; HD95 has no distance to give."""
    assembler = VolumeAssembler()
    for k in range(2):
        assembler.add("A", "c0", k, torch.ones(4, 4), torch.zeros(4, 4))
    [row] = assembler.results()
    assert row["dice_3d"] == 0.0 and math.isnan(row["hd95_3d"])


def test_overlapping_predictions_are_averaged():
    label = label_volume(depth=1)
    label[0, 1:3, 1:3] = 1
    assembler = VolumeAssembler()
    assembler.add("A", "c0", 0, torch.where(label[0] > 0, 0.2, 0.0), label[0])
    assembler.add("A", "c0", 0, torch.where(label[0] > 0, 0.9, 0.0), label[0])
    assert assembler.results()[0]["dice_3d"] == 1.0  # mean 0.55 > 0.5
    assembler.add("A", "c0", 0, torch.zeros(4, 4), label[0])
    assert assembler.results()[0]["dice_3d"] == 0.0  # mean 1.1 / 3 < 0.5


def test_stack_windows_go_to_their_slices_and_edge_replicates_count():
    """Window k's position j is slice stack_indices(D, N)[k, j]; positions past an end repeat it."""
    depth, n = 5, 5
    label = torch.zeros(depth, 1, depth, dtype=torch.uint8)
    label[torch.arange(depth), 0, torch.arange(depth)] = 1  # slice i: one voxel, at column i
    windows = torch.as_tensor(stack_indices(depth, n))
    # Every position predicts its own slice's label: right only if positions map to stack_indices.
    correct = VolumeAssembler()
    for k, stack in enumerate(windows):
        correct.add("A", "c0", k, 0.9 * label[stack].float(), label[stack])
    assert correct.results()[0]["dice_3d"] == 1.0
    # Replicated positions (past either end) predict nothing. Slices 0 and 4 are in 6 window
    # positions, 3 of them replicates: mean 0.45 < 0.5, so they are missed; slices 1-3 are found.
    replicated = (torch.arange(depth)[:, None] + torch.arange(n)[None] - n // 2 < 0) | (
        torch.arange(depth)[:, None] + torch.arange(n)[None] - n // 2 >= depth
    )
    edges = VolumeAssembler()
    for k, stack in enumerate(windows):
        edges.add("A", "c0", k, 0.9 * label[stack].float() * ~replicated[k, :, None, None], label[stack])
    assert edges.results()[0]["dice_3d"] == pytest.approx(2 * 3 / (3 + 5))


def test_centre_labels_only_with_stack_predictions():
    """A (1, H, W) label is the centre slice's: every slice still gets its label as some stack's centre."""
    depth, n = 4, 3
    label = label_volume(depth)
    assembler = VolumeAssembler()
    for k, stack in enumerate(torch.as_tensor(stack_indices(depth, n))):
        assembler.add("A", "c0", k, label[stack].float(), label[k][None])
    assert assembler.results() == [{"site": "A", "case": "c0", "dice_3d": 1.0, "hd95_3d": 0.0, "num_slices": depth}]


def test_gaps_raise_with_the_case_and_missing_slices():
    label = label_volume(depth=6)
    assembler = VolumeAssembler()
    for k in (0, 1, 4, 5):
        assembler.add("B", "Case07", k, label[k].float(), label[k])
    with pytest.raises(ValueError, match=r"'Case07' of site 'B' is missing slices \[2, 3\]"):
        assembler.results()


def test_conflicting_labels_and_shapes_raise():
    assembler = VolumeAssembler()
    assembler.add("A", "c0", 0, torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="two different labels for slice 0"):
        assembler.add("A", "c0", 0, torch.zeros(4, 4), torch.ones(4, 4))
    with pytest.raises(ValueError, match="slice size"):
        assembler.add("A", "c0", 1, torch.zeros(5, 5), torch.zeros(5, 5))
    with pytest.raises(ValueError, match="N odd"):
        assembler.add("A", "c0", 1, torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
