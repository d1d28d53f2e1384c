"""Robust aggregation, for federations that expect hostile or broken sites.

FedAvg's weighted mean follows any single update as far as it goes: one site can move the global
model anywhere. The update checks (:mod:`fedfms.fl.checks.updates`) refuse what is plainly wrong;
these rules also bound what a minority of plausible-looking updates can do:

* ``median``: the coordinate-wise median of the sites' tensors (the mean of the two middle values
  for an even count). With K sites, fewer than K/2 of them cannot move a coordinate outside the
  range of the honest values.
* ``trimmed_mean``: per coordinate, drop the ``floor(trim_fraction * K)`` largest and smallest
  values and average the rest. With fewer sites than ``1 / trim_fraction`` nothing is dropped:
  that is FedAvg without its weights (a warning says so).

Both ignore the sites' sample counts (an attacker would inflate its own), so a small site weighs
as much as a large one; both keep every site's tensors in memory until the round ends (K model
copies in float64, against one running sum for FedAvg), and sort K values per coordinate.
Norm clipping of each change is the controller's (``clip_change_norm`` of
:class:`~fedfms.fl.workflows.fedavg.ResumableFedAvg`) and combines with any of these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

#: How the sites' values of one coordinate become the global one: FedAvg's weighted mean, or a robust rule.
COMBINES = ("mean", "median", "trimmed_mean")
ROBUST_COMBINES = COMBINES[1:]


def check_combine(combine: str, trim_fraction: float) -> None:
    if combine not in COMBINES:
        raise ValueError(f"unknown aggregation {combine!r}; choose from {', '.join(COMBINES)}")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")


def trimmed_count(sites: int, trim_fraction: float) -> int:
    """How many values a trimmed mean drops at each end for ``sites`` values (always leaving one)."""
    return min(math.floor(trim_fraction * sites), (sites - 1) // 2)


def robust_combine(values: list[torch.Tensor], combine: str, trim_fraction: float = 0.2) -> torch.Tensor:
    """The coordinate-wise ``median`` or ``trimmed_mean`` of same-shaped tensors, in float64."""
    if not values:
        raise ValueError("no values to combine")
    ordered = torch.stack([v.to(torch.float64) for v in values]).sort(dim=0).values
    count = len(values)
    if combine == "median":
        return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2
    if combine == "trimmed_mean":
        cut = trimmed_count(count, trim_fraction)
        return ordered[cut : count - cut].mean(dim=0)
    raise ValueError(f"unknown robust aggregation {combine!r}; choose from {', '.join(ROBUST_COMBINES)}")


def restore(value: torch.Tensor, dtype: torch.dtype, as_numpy: bool) -> Any:
    """Cast back to the sites' dtype (rounding integer buffers such as step counters) and container."""
    value = (value if dtype.is_floating_point else value.round()).to(dtype)
    return value.numpy() if as_numpy else value


class RobustAggregator(ModelAggregator):
    """Coordinate-wise ``median`` or ``trimmed_mean`` of the round's accepted updates, for ``FedAvg(aggregator=...)``.

    Unweighted (``weighted = False``: the records leave the weight column empty). Updates must all
    be FULL weights or all weight differences (DIFF); the result has the same kind.

    Args:
        combine: ``median`` or ``trimmed_mean``.
        trim_fraction: share of the values a trimmed mean drops at each end, per coordinate.
    """

    weighted = False

    def __init__(self, combine: str = "median", trim_fraction: float = 0.2) -> None:
        super().__init__()
        check_combine(combine, trim_fraction)
        if combine == "mean":
            raise ValueError("RobustAggregator combines by median or trimmed_mean; FedAvg's own aggregation is the mean")
        self.combine = combine
        self.trim_fraction = trim_fraction
        self.reset_stats()

    def accept_model(self, model: FLModel) -> None:
        if self._updates and model.params_type != self._params_type:
            raise ValueError(f"params_type {model.params_type} differs from the round's first update ({self._params_type})")
        self._params_type = model.params_type
        self._updates.append(model.params)

    def aggregate_model(self) -> FLModel:
        try:
            if not self._updates:
                raise RuntimeError("no update was accepted this round; nothing to aggregate")
            count, first = len(self._updates), self._updates[0]
            if self.combine == "trimmed_mean" and not trimmed_count(count, self.trim_fraction):
                self.warning(f"trimmed mean of {count} sites with trim_fraction {self.trim_fraction} drops nothing: an unweighted mean")
            params = {}
            for key, value in first.items():
                values = [torch.as_tensor(update[key]) for update in self._updates]
                params[key] = restore(robust_combine(values, self.combine, self.trim_fraction), values[0].dtype, isinstance(value, np.ndarray))
            self.info(f"{self.combine} of {count} updates over {len(params)} tensors")
            return FLModel(params=params, params_type=self._params_type, meta={"aggregation": self.combine, "num_updates": count})
        finally:
            self.reset_stats()

    def reset_stats(self) -> None:
        self._updates: list[dict] = []
        self._params_type = None
