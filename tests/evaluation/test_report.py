"""SegmentationReport end to end on a real SupervisedEvaluator with hand-computed expectations."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import Lambdad
from torch import nn

from fedfms.bundle import TEST_METRICS
from fedfms.evaluation import SegmentationReport, summarize
from fedfms.evaluation.report import METRICS
from fedfms.models.inputs import StackInput
from fedfms.transforms import SliceStacksd

SQUARE = (slice(1, 3), slice(1, 3))  # 2x2 foreground of a 4x4 label slice


def label_volume(foreground: list[bool]) -> torch.Tensor:
    """(D, 4, 4) uint8 label; slice k holds SQUARE if foreground[k]."""
    label = torch.zeros(len(foreground), 4, 4, dtype=torch.uint8)
    for k, on in enumerate(foreground):
        label[(k, *SQUARE)] = int(on)
    return label


# Two sites: A/a0 with empty first and last slices; B/b0 all foreground; B/b1 all empty.
CASES = {
    ("A", "a0"): label_volume([False, True, True, False]),
    ("B", "b0"): label_volume([True, True, True]),
    ("B", "b1"): label_volume([False, False]),
}


def samples(num_slices: int, all_label_slices: bool, cases: dict = CASES) -> list[dict]:
    """Prepared-style samples: image stacks at twice the label size (so predictions are resized)."""
    stacker = SliceStacksd(["image", "label"], num_slices, all_label_slices=all_label_slices)
    out = []
    for (site, case), label in cases.items():
        image = label.float().repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (D, 8, 8)
        out += stacker({"image": image, "label": label, "site": site, "case": case})
    return out


class MaskLogits(nn.Module):
    """Logits (+-10) of the centre input channel's mask, moved ``shift`` label pixels to the right."""

    def __init__(self, shift: int = 0, softmax: bool = False) -> None:
        super().__init__()
        self.shift, self.softmax = shift, softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x.shape[1] // 2
        mask = torch.roll(x[:, centre : centre + 1] > 0.5, 2 * self.shift, dims=-1)  # image is 2x the label size
        logits = mask.float() * 20 - 10
        return torch.cat([-logits, logits], dim=1) if self.softmax else logits


MODES = [  # input mode, stack size, labels of every stack slice
    ("channels", 1, False),  # FedFMS: one slice per sample
    ("channels", 3, True),  # 2.5D network with stack labels: scored on the centre label
    ("slices", 3, True),  # FLAP-SAM: every slice of the stack predicted and labelled
    ("slices", 3, False),
]


def evaluate(
    tmp_path: Path, mode: str, n: int, all_labels: bool, network: nn.Module, activation: str, cases: dict = CASES, **kwargs
) -> SupervisedEvaluator:
    report = SegmentationReport(tmp_path, activation=activation, input_mode=mode, num_slices=n)
    loader = DataLoader(Dataset(samples(n, all_labels, cases)), batch_size=4)  # batches mix sites and cases
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=StackInput(network, mode), **kwargs
    )
    report.attach(evaluator)
    evaluator.run()
    return evaluator


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("mode,n,all_labels", MODES)
def test_perfect_predictions_score_one(tmp_path, mode, n, all_labels):
    # Decollation and a postprocessing that would invert the masks must not reach the report.
    evaluator = evaluate(
        tmp_path, mode, n, all_labels, MaskLogits(softmax=True), "softmax", decollate=True, postprocessing=Lambdad("pred", torch.neg)
    )
    evaluator.run()  # a second run replaces the report, it does not add to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_site.csv", "per_slice.csv", "per_volume.csv", "summary.json"]
    rows = read_csv(tmp_path / "per_slice.csv")
    assert [(r["site"], r["case"], int(r["slice"])) for r in rows] == [
        (site, case, k) for (site, case), label in CASES.items() for k in range(len(label))
    ]
    assert all(float(r["dice"]) == 1.0 and float(r["iou"]) == 1.0 for r in rows)
    assert [r["label_empty"] for r in rows] == [str(not label[k].any()) for label in CASES.values() for k in range(len(label))]
    assert all(r["pred_foreground"] != r["label_empty"] for r in rows)
    volumes = read_csv(tmp_path / "per_volume.csv")
    assert [(v["case"], int(v["num_slices"]), float(v["dice_3d"]), v["hd95_3d"]) for v in volumes] == [
        ("a0", 4, 1.0, "0.0"), ("b0", 3, 1.0, "0.0"), ("b1", 2, 1.0, "nan"),  # b1: nothing to measure a distance to
    ]
    assert {k: evaluator.state.metrics[k] for k in METRICS} == {
        "dice_2d": 1.0, "iou_2d": 1.0, "dice_3d": 1.0, "dice_2d_fg": 1.0, "fp_rate_empty": 0.0, "hd95_3d": 0.0,
    }


@pytest.mark.parametrize("mode,n,all_labels", MODES)
def test_shifted_predictions_hand_computed(tmp_path, mode, n, all_labels):
    """Moving the 2x2 square one pixel keeps 2 of 4 pixels: Dice 1/2, IoU 1/3 on every gland slice."""
    evaluator = evaluate(tmp_path, mode, n, all_labels, MaskLogits(shift=1), "sigmoid")
    third = 1 / 3
    rows = read_csv(tmp_path / "per_slice.csv")
    gland = {("a0", 1), ("a0", 2), ("b0", 0), ("b0", 1), ("b0", 2)}  # the other 4 are empty, predicted empty
    scores = {(r["case"], int(r["slice"])): (float(r["dice"]), float(r["iou"])) for r in rows}
    assert len(scores) == 9
    for key, (dice, iou) in scores.items():
        assert (dice, iou) == ((0.5, pytest.approx(third)) if key in gland else (1.0, 1.0)), key
    volumes = {v["case"]: float(v["dice_3d"]) for v in read_csv(tmp_path / "per_volume.csv")}
    assert volumes == {"a0": 0.5, "b0": 0.5, "b1": 1.0}  # 2*4/(8+8), 2*6/(12+12), empty/empty

    # The empty slices are predicted empty (fp_rate_empty 0), the gland slices at Dice 1/2. HD95: a
    # square moved one pixel is 1 away on half of its edge voxels, 0 on the others; b1 (empty
    # label, empty prediction) has no HD95 and is left out.
    hd95 = {v["case"]: float(v["hd95_3d"]) for v in read_csv(tmp_path / "per_volume.csv")}
    assert hd95["a0"] == 1.0 and hd95["b0"] == 1.0 and math.isnan(hd95["b1"])
    new_a = {"dice_2d_fg": 0.5, "fp_rate_empty": 0.0, "hd95_3d": 1.0, "num_fg_slices": 2, "num_empty_slices": 2, "num_hd95_excluded": 0}
    new_b = {"dice_2d_fg": 0.5, "fp_rate_empty": 0.0, "hd95_3d": 1.0, "num_fg_slices": 3, "num_empty_slices": 2, "num_hd95_excluded": 1}
    site_a = {"dice_2d": 3 / 4, "iou_2d": (2 + 2 * third) / 4, "dice_3d": 0.5, "num_slices": 4, "num_volumes": 1} | new_a
    site_b = {"dice_2d": 3.5 / 5, "iou_2d": (2 + 3 * third) / 5, "dice_3d": 0.75, "num_slices": 5, "num_volumes": 2} | new_b
    totals = {"num_slices": 9, "num_volumes": 3, "num_fg_slices": 5, "num_empty_slices": 4, "num_hd95_excluded": 1}
    average = {m: (site_a[m] + site_b[m]) / 2 for m in METRICS} | totals
    pooled = {"dice_2d": 6.5 / 9, "iou_2d": (4 + 5 * third) / 9, "dice_3d": 2 / 3, "dice_2d_fg": 0.5, "fp_rate_empty": 0.0, "hd95_3d": 1.0} | totals
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sites"].keys() == {"A", "B"}
    for got, expected in [(summary["sites"]["A"], site_a), (summary["sites"]["B"], site_b), (summary["average"], average), (summary["pooled"], pooled)]:
        assert got == pytest.approx(expected)
    assert summary["protocol"]["input_mode"] == mode
    assert summary["protocol"]["empty"] == "empty-slice rule: an empty label scores 1 if the prediction is empty, else 0"
    assert set(METRICS) <= set(summary["protocol"]) and "pixels of the prepared label grid" in summary["protocol"]["hd95_3d"]

    table = read_csv(tmp_path / "per_site.csv")
    assert [r.pop("site") for r in table] == ["A", "B", "average", "pooled"]
    for row, expected in zip(table, [site_a, site_b, average, pooled]):
        assert {k: float(v) for k, v in row.items()} == pytest.approx(expected)
    metrics = evaluator.state.metrics
    assert metrics["dice_2d"] == pytest.approx(0.725) and metrics["dice_3d"] == pytest.approx(0.625)
    assert metrics["B/dice_3d"] == pytest.approx(0.75)
    assert metrics["dice_2d_fg"] == 0.5 and metrics["fp_rate_empty"] == 0.0 and metrics["hd95_3d"] == 1.0


class FalsePositiveOnEmpty(MaskLogits):
    """The right mask, plus foreground at label pixel (0, 0) wherever the input slice has no organ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        empty = ~(x[:, x.shape[1] // 2] > 0.5).flatten(1).any(1)
        corner = torch.zeros_like(logits, dtype=torch.bool)
        corner[..., :2, :2] = True  # one label pixel is 2x2 input pixels
        return torch.where(corner & empty[:, None, None, None], 10.0, logits)


# S: one empty slice (with a false positive); T: only empty slices (each with a false positive); U: organ on every slice.
FP_CASES = {
    ("S", "s0"): label_volume([False, True, True]),
    ("T", "t0"): label_volume([False, False]),
    ("U", "u0"): label_volume([True, True]),
}


@pytest.mark.parametrize("mode,n,all_labels", MODES)
def test_one_false_positive_pixel_on_an_empty_slice(tmp_path, mode, n, all_labels):
    """Hand-computed: the empty-slice rule scores S's empty slice 0; dice_2d_fg does not see it,
    fp_rate_empty counts it; metrics undefined at a site (no organ slice, no empty slice, no HD95)
    are NaN there and left out of the average over sites."""
    evaluator = evaluate(tmp_path, mode, n, all_labels, FalsePositiveOnEmpty(), "sigmoid", cases=FP_CASES)
    rows = [(r["case"], int(r["slice"]), float(r["dice"]), r["label_empty"], r["pred_foreground"]) for r in read_csv(tmp_path / "per_slice.csv")]
    assert rows[:3] == [("s0", 0, 0.0, "True", "True"), ("s0", 1, 1.0, "False", "True"), ("s0", 2, 1.0, "False", "True")]
    # s0 in 3D: 8 organ voxels found, 1 false positive: Dice 2*8/(8+9). HD95 pred -> label: 8 x 0 and
    # the corner (0, 0, 0) at sqrt(3) from (1, 1, 1); position 0.95 * 8 = 7.6: 0.6 * sqrt(3).
    # label -> pred: all 0. t0: an empty label with false positives, Dice 0 by the empty rule, no HD95.
    hd95_s0 = 0.6 * math.sqrt(3)
    nan = math.nan
    expected = {
        "S": {"dice_2d": 2 / 3, "iou_2d": 2 / 3, "dice_3d": 16 / 17, "dice_2d_fg": 1.0, "fp_rate_empty": 1.0, "hd95_3d": hd95_s0,
              "num_slices": 3, "num_fg_slices": 2, "num_empty_slices": 1, "num_volumes": 1, "num_hd95_excluded": 0},
        "T": {"dice_2d": 0.0, "iou_2d": 0.0, "dice_3d": 0.0, "dice_2d_fg": nan, "fp_rate_empty": 1.0, "hd95_3d": nan,
              "num_slices": 2, "num_fg_slices": 0, "num_empty_slices": 2, "num_volumes": 1, "num_hd95_excluded": 1},
        "U": {"dice_2d": 1.0, "iou_2d": 1.0, "dice_3d": 1.0, "dice_2d_fg": 1.0, "fp_rate_empty": nan, "hd95_3d": 0.0,
              "num_slices": 2, "num_fg_slices": 2, "num_empty_slices": 0, "num_volumes": 1, "num_hd95_excluded": 0},
    }
    totals = {"num_slices": 7, "num_fg_slices": 4, "num_empty_slices": 3, "num_volumes": 3, "num_hd95_excluded": 1}
    expected["average"] = {
        "dice_2d": (2 / 3 + 1) / 3, "iou_2d": (2 / 3 + 1) / 3, "dice_3d": (16 / 17 + 1) / 3,
        "dice_2d_fg": 1.0, "fp_rate_empty": 1.0, "hd95_3d": hd95_s0 / 2,  # over S and U; S and T; S and U
    } | totals
    expected["pooled"] = {
        "dice_2d": 4 / 7, "iou_2d": 4 / 7, "dice_3d": (16 / 17 + 1) / 3, "dice_2d_fg": 1.0, "fp_rate_empty": 1.0, "hd95_3d": hd95_s0 / 2,
    } | totals

    table = {r.pop("site"): {k: float(v) for k, v in r.items()} for r in read_csv(tmp_path / "per_site.csv")}
    assert list(table) == ["S", "T", "U", "average", "pooled"]
    for site, values in expected.items():
        assert table[site] == pytest.approx(values, nan_ok=True, abs=1e-6), site
    summary = json.loads((tmp_path / "summary.json").read_text())  # NaN is written as null
    assert summary["sites"]["T"]["dice_2d_fg"] is None and summary["sites"]["U"]["fp_rate_empty"] is None
    assert summary["sites"]["T"]["hd95_3d"] is None and summary["average"]["hd95_3d"] == pytest.approx(hd95_s0 / 2)
    metrics = evaluator.state.metrics
    assert metrics["dice_2d"] == pytest.approx(5 / 9) and metrics["dice_2d_fg"] == 1.0 and metrics["fp_rate_empty"] == 1.0
    assert metrics["S/dice_2d"] == pytest.approx(2 / 3) and math.isnan(metrics["U/fp_rate_empty"])


class CentreOnly(MaskLogits):
    """In slices mode: the right mask at each stack's centre position, confident background elsewhere."""

    def __init__(self, num_slices: int) -> None:
        super().__init__()
        self.num_slices = num_slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        off_centre = torch.arange(len(x)) % self.num_slices != self.num_slices // 2  # item b*N+j is position j
        return torch.where(off_centre[:, None, None, None], -10.0, logits)


def test_slices_mode_scores_3d_on_all_window_predictions(tmp_path):
    """2D uses the centre predictions only (perfect); 3D averages each slice over its 3 windows,
    of which only 1 predicts foreground: mean 1/3 < 0.5, so every gland slice is missed in 3D."""
    evaluate(tmp_path, "slices", 3, True, CentreOnly(3), "sigmoid")
    assert all(float(r["dice"]) == 1.0 for r in read_csv(tmp_path / "per_slice.csv"))
    volumes = {v["case"]: float(v["dice_3d"]) for v in read_csv(tmp_path / "per_volume.csv")}
    assert volumes == {"a0": 0.0, "b0": 0.0, "b1": 1.0}


def test_stack_size_mismatch_is_reported(tmp_path):
    """A report set up for 3-slice stacks refuses the 5 predictions per sample of a 5-slice datalist."""
    report = SegmentationReport(tmp_path, input_mode="slices", num_slices=3)
    loader = DataLoader(Dataset(samples(5, False)), batch_size=4)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=StackInput(MaskLogits(), "slices"))
    report.attach(evaluator)
    with pytest.raises(ValueError, match="slices mode expects 12 predictions for 4 samples, got 20"):
        evaluator.run()


def test_summarize_averages_over_sites_not_slices():
    organ = {"label_empty": False, "pred_foreground": True}
    slices = [{"site": "A", "dice": 1.0, "iou": 1.0, **organ}] + [{"site": "B", "dice": 0.0, "iou": 0.0, **organ}] * 3
    volumes = [{"site": "A", "dice_3d": 1.0, "hd95_3d": 0.0}, {"site": "B", "dice_3d": 0.0, "hd95_3d": 4.0}]
    summary = summarize(slices, volumes)
    assert summary["average"]["dice_2d"] == 0.5 and summary["pooled"]["dice_2d"] == 0.25
    assert summary["average"]["dice_2d_fg"] == 0.5 and summary["average"]["hd95_3d"] == 2.0
    assert summary["average"]["num_slices"] == 4 and summary["average"]["num_volumes"] == 2
    assert math.isnan(summary["average"]["fp_rate_empty"]) and summary["average"]["num_empty_slices"] == 0  # no empty slice anywhere


def test_evaluate_checkpoint_returns_every_report_metric_old_ones_first():
    assert TEST_METRICS == METRICS and TEST_METRICS[:3] == ("dice_2d", "iou_2d", "dice_3d")
