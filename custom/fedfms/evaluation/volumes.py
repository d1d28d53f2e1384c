"""Per-volume 3D Dice (FLAP-SAM's protocol) and HD95 from the 2D predictions of prepared samples.

A prepared sample is one slice of a case, or an N-slice stack centred on it (see
:func:`fedfms.transforms.stack_indices`). :class:`VolumeAssembler` puts the predictions of a case's
samples back into a (D, H, W) volume and scores it against the label volume rebuilt from the same
samples. The volume therefore has the prepared label resolution in-plane (e.g. 256 x 256) and the
source depth; it is not resampled back to the original image grid, so its HD95 is in voxels of that
grid (pixels of the prepared label grid in-plane, slice-index steps in depth), not in millimetres.

- Predictions are foreground probabilities, not logits: the mean of probabilities is the usual
  ensemble of overlapping windows, and it stays in [0, 1] so 0.5 keeps its meaning.
- A slice predicted by several windows (FLAP-SAM's sliding 5-slice windows: slice k is in the
  stacks centred on k-2 .. k+2) gets the mean of all its predictions. Window positions past either
  end of the volume repeat the first or last slice, as in ``stack_indices``, and count for that slice.
- The mean probability is thresholded at > 0.5 (the same as argmax for two-class softmax) and
  compared with the label volume by :func:`~fedfms.evaluation.metrics.volume_dice`, whose
  empty-label rule is that of the 2D scores, and by :func:`~fedfms.evaluation.metrics.volume_hd95`,
  NaN when the label or the thresholded prediction of the volume is empty.
- A case's depth is its highest centre slice + 1, and every slice below must be the centre of some
  sample, otherwise :meth:`VolumeAssembler.results` raises. Slices missing at the top of a volume
  cannot be told from a shorter volume: evaluate datalists prepared with empty slices kept (the
  default), and all samples of a case.

Everything is held on the CPU until :meth:`VolumeAssembler.results`: one float32 probability sum
and one bool label per slice, i.e. about 320 KB per slice at 256 x 256.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from fedfms.evaluation.metrics import volume_dice, volume_hd95


@dataclass
class _Case:
    """What has been added for one case, keyed by slice index (indices past the end kept as given)."""

    size: tuple[int, int]
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    labels: dict[int, torch.Tensor] = field(default_factory=dict)
    centres: set[int] = field(default_factory=set)


class VolumeAssembler:
    """Collect per-slice foreground probabilities and labels by case; score each volume in 3D."""

    def __init__(self) -> None:
        self._cases: dict[tuple[str, str], _Case] = {}

    def add(self, site: str, case: str, slice_index: int, probability: torch.Tensor, label: torch.Tensor) -> None:
        """Add the prediction of the sample centred on ``slice_index`` of ``case``.

        Args:
            probability: foreground probability, (H, W) for the centre slice alone, or (N, H, W)
                for a whole stack (N odd; item j is slice ``slice_index - N//2 + j``).
            label: the sample's label as prepared: (H, W) or (1, H, W) for the centre slice, or
                (N, H, W) for every slice of the stack; foreground is ``label > 0``.
        """
        prob = torch.as_tensor(probability).detach().float().cpu()
        lab = torch.as_tensor(label).detach().cpu() > 0
        prob, lab = (prob[None] if prob.ndim == 2 else prob), (lab[None] if lab.ndim == 2 else lab)
        n = prob.shape[0]
        if prob.ndim != 3 or n % 2 == 0:
            raise ValueError(f"probability must be (H, W) or (N, H, W) with N odd, got {tuple(probability.shape)}")
        if lab.ndim != 3 or lab.shape[0] not in (1, n) or lab.shape[1:] != prob.shape[1:]:
            raise ValueError(f"label {tuple(label.shape)} does not match probability {tuple(probability.shape)}")
        if slice_index < 0:
            raise ValueError(f"slice index must be >= 0, got {slice_index}")
        buffer = self._cases.setdefault((site, case), _Case(tuple(prob.shape[1:])))
        if tuple(prob.shape[1:]) != buffer.size:
            raise ValueError(f"case {case!r} of site {site!r}: slice size {tuple(prob.shape[1:])} differs from {buffer.size}")
        # Positions before slice 0 repeat it; positions past the end are folded in results(),
        # once the depth is known.
        indices = [max(i, 0) for i in range(slice_index - n // 2, slice_index + n // 2 + 1)]
        for i, p in zip(indices, prob):
            buffer.sums[i] = buffer.sums[i] + p if i in buffer.sums else p.clone()
            buffer.counts[i] += 1
        for i, m in zip(indices, lab) if lab.shape[0] == n else [(slice_index, lab[0])]:
            if i in buffer.labels and not torch.equal(buffer.labels[i], m):
                raise ValueError(f"case {case!r} of site {site!r}: two different labels for slice {i}")
            buffer.labels[i] = m
        buffer.centres.add(slice_index)

    def results(self) -> list[dict]:
        """One row per case, sorted by site and case: ``site, case, dice_3d, hd95_3d, num_slices``.

        ``hd95_3d`` is NaN for a volume whose label or prediction is empty (:func:`volume_hd95`).

        Raises:
            ValueError: a case has slices below its highest one that no sample was centred on.
        """
        return [self._score(site, case, buffer) for (site, case), buffer in sorted(self._cases.items())]

    @staticmethod
    def _score(site: str, case: str, buffer: _Case) -> dict:
        depth = max(buffer.centres) + 1
        missing = sorted(set(range(depth)) - buffer.centres)
        if missing:
            raise ValueError(
                f"case {case!r} of site {site!r} is missing slices {missing} (of 0..{depth - 1}); 3D Dice needs "
                "every slice of a volume: evaluate all samples of the case, prepared with empty slices kept"
            )
        sums = [buffer.sums[i] for i in range(depth)]
        counts = [buffer.counts[i] for i in range(depth)]
        for i in (i for i in buffer.sums if i >= depth):  # window positions past the end repeat the last slice
            sums[-1] = sums[-1] + buffer.sums[i]
            counts[-1] += buffer.counts[i]
        probability = torch.stack(sums) / torch.tensor(counts, dtype=torch.float32)[:, None, None]
        label = torch.stack([buffer.labels[i] for i in range(depth)])
        pred = probability > 0.5
        return {"site": site, "case": case, "dice_3d": volume_dice(pred, label), "hd95_3d": volume_hd95(pred, label), "num_slices": depth}
