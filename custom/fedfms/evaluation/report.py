"""Per-slice, per-volume and per-site segmentation report of a MONAI ``SupervisedEvaluator``.

The evaluator runs over a prepared datalist (keys image, label, site, case, slice). The protocol:

- Foreground probability: sigmoid of a 1-channel logit, or 1 - softmax(background) for C+1
  channels with background first (several foreground classes are scored as one foreground, label
  > 0, as the prostate gland is). If the prediction's in-plane size differs from the label's, the
  probability is resized to the label size, bilinearly, before thresholding at > 0.5: all scores
  are at the prepared label resolution (FedFMS: 256, where its logits already are).
- 2D Dice and IoU (FedFMS): one score per sample, its centre slice's prediction against its centre
  label (index N//2 of an (N, L, L) label), so every slice counts once also when a ``slices``-mode
  network predicts all N slices of each stack.
- 3D Dice (FLAP-SAM) and HD95: every prediction goes to a :class:`VolumeAssembler`; in ``slices``
  mode all N predictions of a stack, at their slice indices, so a slice predicted by several
  sliding windows gets their mean probability. Volumes are the prepared slices stacked in slice order.
- The empty-slice rule (the papers'): a slice or volume whose label is empty scores Dice and IoU 1
  if the prediction is empty too, else 0 (:mod:`fedfms.evaluation.metrics`). It holds for
  ``dice_2d``, ``iou_2d`` and ``dice_3d``. Averaged over all slices it mixes outlining the organ
  with predicting nothing where there is none (one false-positive pixel on an empty slice scores
  0), so the two are also reported apart:

  - ``dice_2d_fg``: mean 2D Dice over the slices whose centre label contains the organ;
  - ``fp_rate_empty``: share of the slices with an empty centre label on which the prediction has
    any foreground (NaN for a site without empty slices).

- ``hd95_3d``: 95th-percentile Hausdorff distance per volume (MONAI), in voxels of the prepared
  volume: pixels of the prepared label grid in-plane, slice-index steps in depth; not millimetres.
  A volume whose label or prediction is empty has none (NaN): it is left out of the mean and
  counted in ``num_hd95_excluded``.
- Per site: 2D scores averaged over the site's slices, 3D scores over its volumes, with the counts
  behind them (``num_slices``, ``num_fg_slices``, ``num_empty_slices``, ``num_volumes``,
  ``num_hd95_excluded``). ``average`` is the unweighted mean over the sites where the value is
  defined (the papers' "Average" column; counts are summed); ``pooled`` is the mean over all slices
  (2D) and all volumes (3D) regardless of site. Undefined values are NaN in the tables and
  ``engine.state.metrics``, and null in ``summary.json`` (JSON has no NaN).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import IterationEvents
from monai.handlers import from_engine
from monai.utils import CommonKeys

from fedfms.evaluation.metrics import slice_scores
from fedfms.evaluation.volumes import VolumeAssembler
from fedfms.io import save_csv, save_json
from fedfms.models.inputs import INPUT_MODES

ACTIVATIONS = ("sigmoid", "softmax")
# The first three keep their names and order: per_site.csv and final_test.csv readers rely on them.
METRICS = ("dice_2d", "iou_2d", "dice_3d", "dice_2d_fg", "fp_rate_empty", "hd95_3d")
COUNTS = ("num_slices", "num_fg_slices", "num_empty_slices", "num_volumes", "num_hd95_excluded")
SITE_FIELDS = ("site", *METRICS, *COUNTS)
SLICE_FIELDS = ("site", "case", "slice", "dice", "iou", "label_empty", "pred_foreground")
VOLUME_FIELDS = ("site", "case", "num_slices", "dice_3d", "hd95_3d")
EMPTY_RULE = "empty-slice rule: an empty label scores 1 if the prediction is empty, else 0"


def summarize(slices: Sequence[dict], volumes: Sequence[dict]) -> dict:
    """Per-site means, their unweighted mean over sites (``average``) and the ``pooled`` means.

    Args:
        slices: rows ``site, case, slice, dice, iou, label_empty, pred_foreground``.
        volumes: rows ``site, case, num_slices, dice_3d, hd95_3d`` (:meth:`VolumeAssembler.results`).

    A site's value can be NaN (``fp_rate_empty`` of a site without empty slices, ``hd95_3d`` of one
    whose volumes all have an empty label or prediction): ``average`` then takes the mean over the
    sites where it is defined, so one such site does not blank the column.
    """
    sites = sorted({row["site"] for row in slices})
    per_site = {s: _means([r for r in slices if r["site"] == s], [v for v in volumes if v["site"] == s]) for s in sites}
    average = {m: _defined_mean(per_site[s][m] for s in sites) for m in METRICS}
    average |= {k: sum(per_site[s][k] for s in sites) for k in COUNTS}
    return {"sites": per_site, "average": average, "pooled": _means(slices, volumes)}


def _means(slices: Sequence[dict], volumes: Sequence[dict]) -> dict:
    """The metrics of one group of slices and volumes (a site, or all of them), with their counts."""
    organ = [r for r in slices if not r["label_empty"]]
    empty = [r for r in slices if r["label_empty"]]
    hd95 = [v["hd95_3d"] for v in volumes]
    return {
        "dice_2d": fmean(r["dice"] for r in slices),
        "iou_2d": fmean(r["iou"] for r in slices),
        "dice_3d": fmean(v["dice_3d"] for v in volumes),
        "dice_2d_fg": _defined_mean(r["dice"] for r in organ),
        "fp_rate_empty": _defined_mean(float(r["pred_foreground"]) for r in empty),
        "hd95_3d": _defined_mean(hd95),
        "num_slices": len(slices),
        "num_fg_slices": len(organ),
        "num_empty_slices": len(empty),
        "num_volumes": len(volumes),
        "num_hd95_excluded": sum(math.isnan(h) for h in hd95),
    }


def _defined_mean(values: Iterable[float]) -> float:
    """Mean of the values that are not NaN; NaN when there are none (nothing to average is not 0)."""
    defined = [v for v in values if not math.isnan(v)]
    return fmean(defined) if defined else math.nan


def _null_nan(value: Any) -> Any:
    """``value`` with every NaN float replaced by None, so that summary.json stays standard JSON."""
    if isinstance(value, dict):
        return {k: _null_nan(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


class SegmentationReport:
    """Score every sample a ``SupervisedEvaluator`` sees and write the report at each epoch end.

    Files in ``output_dir``, each replaced atomically at every ``EPOCH_COMPLETED`` (i.e. every
    evaluator run): ``per_slice.csv`` (site, case, slice, dice, iou, label_empty: the centre label
    has no organ, pred_foreground: the centre prediction has any foreground), ``per_volume.csv``
    (site, case, num_slices, dice_3d, hd95_3d), ``per_site.csv`` (:data:`SITE_FIELDS`, one row per
    site, then ``average`` over sites and ``pooled``) and ``summary.json`` (the same numbers and the
    protocol, each rule in words). ``engine.state.metrics`` gets every name in :data:`METRICS`
    (average over sites) and ``<site>/<metric>``; list this handler before ``StatsHandler`` in
    ``val_handlers`` so that it prints them. See the module docstring for the definitions.

    The handler reads ``engine.state.output`` and ``engine.state.batch`` at MONAI's
    ``IterationEvents.FORWARD_COMPLETED``, before the evaluator decollates them and runs its
    ``postprocessing``: it sees the network's raw, batch-first output whatever those settings are
    (decollation would also pair the B*N predictions of ``slices`` mode with B samples wrongly).

    Args:
        output_dir: folder for the report files.
        activation: "sigmoid" for 1-channel logits, "softmax" for C+1 channels, background first.
        input_mode: "channels" (one prediction per sample, (B, C, h, w)) or "slices" (N per
            sample, (B*N, C, h, w), item b*N+j for stack position j); see :mod:`fedfms.models.inputs`.
        num_slices: stack size N of the prepared samples.
        output_transform: ``engine.state.output`` -> (logits, label), label (B, 1 or N, L, L).
        batch_transform: ``engine.state.batch`` -> (sites, cases, slice indices), one per sample.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        activation: str = "sigmoid",
        input_mode: str = "channels",
        num_slices: int = 1,
        output_transform: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = from_engine([CommonKeys.PRED, CommonKeys.LABEL]),
        batch_transform: Callable[[Any], tuple[Sequence, Sequence, Sequence]] = from_engine(["site", "case", "slice"]),
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if input_mode not in INPUT_MODES:
            raise ValueError(f"unknown input mode {input_mode!r}; expected one of {', '.join(INPUT_MODES)}")
        if num_slices < 1 or num_slices % 2 == 0:
            raise ValueError(f"num_slices must be a positive odd number, got {num_slices}")
        self.output_dir = Path(output_dir)
        self.activation = activation
        self.input_mode = input_mode
        self.num_slices = num_slices
        self.output_transform = output_transform
        self.batch_transform = batch_transform
        self._slices: list[dict] = []
        self._volumes = VolumeAssembler()

    def attach(self, engine: Engine) -> None:
        """Register on a MONAI workflow (it must fire ``IterationEvents.FORWARD_COMPLETED``)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self.forward_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        """Start empty: every evaluator run reports only its own samples."""
        self._slices = []
        self._volumes = VolumeAssembler()

    def forward_completed(self, engine: Engine) -> None:
        logits, label = self.output_transform(engine.state.output)
        sites, cases, slice_indices = self.batch_transform(engine.state.batch)
        label = torch.as_tensor(label).detach().cpu()
        batch, n = label.shape[0], self.num_slices if self.input_mode == "slices" else 1
        if label.ndim != 4 or label.shape[1] not in (1, self.num_slices):
            raise ValueError(f"label must be (B, 1 or {self.num_slices}, L, L), got {tuple(label.shape)}")
        probability = self._foreground(logits, label.shape[-2:])
        if probability.shape[0] != batch * n:
            raise ValueError(f"{self.input_mode} mode expects {batch * n} predictions for {batch} samples, got {probability.shape[0]}")
        windows = probability.reshape(batch, n, *label.shape[-2:])  # (B, N or 1, L, L)
        centre_label = label[:, label.shape[1] // 2]
        centre_pred, centre_organ = windows[:, n // 2] > 0.5, centre_label > 0
        dice, iou = slice_scores(centre_pred[:, None], centre_organ[:, None])
        label_empty, pred_foreground = ~centre_organ.flatten(1).any(1), centre_pred.flatten(1).any(1)
        # The assembler takes the whole stack's labels only with the whole stack's predictions.
        volume_labels = label if n > 1 else centre_label[:, None]
        for b, (site, case, index) in enumerate(zip(sites, cases, slice_indices)):
            index = int(index)
            self._slices.append({
                "site": site, "case": case, "slice": index, "dice": float(dice[b]), "iou": float(iou[b]),
                "label_empty": bool(label_empty[b]), "pred_foreground": bool(pred_foreground[b]),
            })
            self._volumes.add(site, case, index, windows[b], volume_labels[b])

    def _foreground(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(B', C, h, w) logits -> (B', L, L) foreground probability at the label size."""
        logits = torch.as_tensor(logits).detach().float().cpu()
        expected = "1 channel" if self.activation == "sigmoid" else "2 or more channels, background first"
        if logits.ndim != 4 or (self.activation == "sigmoid") != (logits.shape[1] == 1):
            raise ValueError(f"{self.activation} needs (B, C, h, w) logits with {expected}, got {tuple(logits.shape)}")
        if self.activation == "sigmoid":
            probability = torch.sigmoid(logits)
        else:
            probability = 1 - torch.softmax(logits, dim=1)[:, :1]
        if probability.shape[-2:] != tuple(size):
            probability = F.interpolate(probability, size=tuple(size), mode="bilinear", align_corners=False)
        return probability[:, 0]

    def epoch_completed(self, engine: Engine) -> None:
        volumes = self._volumes.results()
        summary = summarize(self._slices, volumes)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        slices = sorted(self._slices, key=lambda r: (r["site"], r["case"], r["slice"]))
        save_csv(self.output_dir / "per_slice.csv", slices, SLICE_FIELDS)
        save_csv(self.output_dir / "per_volume.csv", volumes, VOLUME_FIELDS)
        site_rows = [{"site": s, **v} for s, v in summary["sites"].items()]
        site_rows += [{"site": "average", **summary["average"]}, {"site": "pooled", **summary["pooled"]}]
        save_csv(self.output_dir / "per_site.csv", site_rows, SITE_FIELDS)
        save_json(self.output_dir / "summary.json", _null_nan({"epoch": engine.state.epoch, "protocol": self._protocol(), **summary}))
        engine.state.metrics.update({m: summary["average"][m] for m in METRICS})
        engine.state.metrics.update({f"{s}/{m}": v[m] for s, v in summary["sites"].items() for m in METRICS})

    def _protocol(self) -> dict:
        return {
            "activation": self.activation,
            "input_mode": self.input_mode,
            "num_slices": self.num_slices,
            "threshold": "foreground probability > 0.5, at the label resolution",
            "empty": EMPTY_RULE,
            "dice_2d": f"per sample, centre slice prediction vs centre label; mean over all slices, {EMPTY_RULE}",
            "iou_2d": f"as dice_2d, with IoU; {EMPTY_RULE}",
            "dice_3d": f"per case, slices stacked in order, overlapping window predictions averaged; mean over volumes, {EMPTY_RULE}",
            "dice_2d_fg": "mean 2D Dice over the slices whose centre label contains the organ (empty-label slices left out)",
            "fp_rate_empty": "share of the slices with an empty centre label on which the prediction has any foreground; null without empty slices",
            "hd95_3d": (
                "per case as dice_3d, MONAI compute_hausdorff_distance percentile 95 (symmetric, euclidean, between mask edges), "
                "in pixels of the prepared label grid in-plane and slice-index steps in depth (not mm); a volume whose label "
                "or prediction is empty has none and is left out of the mean, counted in num_hd95_excluded"
            ),
            "average": "unweighted mean over the sites where the metric is defined; counts summed",
            "pooled": "mean over all slices (2D) and all volumes (3D)",
        }
