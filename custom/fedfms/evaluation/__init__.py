"""Evaluation of 2D segmentation networks on prepared slices of 3D volumes.

Two protocols on the same predictions: FedFMS's 2D Dice and IoU per slice, and FLAP-SAM's 3D Dice
per volume rebuilt from the slices (sliding-window predictions averaged); both reported per site,
as the mean over sites and pooled. Beside the papers' empty-slice rule (an empty label scores 1 if
nothing is predicted, else 0), the report gives 2D Dice over slices with organ only, the
false-positive rate on empty slices and the 95 % Hausdorff distance per volume.
``fedfms.evaluation.SegmentationReport`` is the ignite handler a bundle's evaluator uses; see
:mod:`fedfms.evaluation.report` for the protocol in full.
"""

from fedfms.evaluation.metrics import slice_scores, volume_dice, volume_hd95
from fedfms.evaluation.report import SegmentationReport, summarize
from fedfms.evaluation.volumes import VolumeAssembler

__all__ = ["SegmentationReport", "VolumeAssembler", "slice_scores", "summarize", "volume_dice", "volume_hd95"]
