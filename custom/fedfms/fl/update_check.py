"""Every client update is checked before it can touch the global model.

NVFlare's built-in aggregation adds a result key by key and turns weights that are not finite and
positive into 1.0, so a bad update is half-added or silently re-weighted. :class:`UpdateValidator`
is asked first, by the FedAvg workflow (:class:`fedfms.fl.fedavg.ResumableFedAvg`), and a bad
update is rejected whole, with the reason:

* keys: exactly those of the global model sent this round. A key the model has but does not
  exchange is *frozen* (a site must not overwrite it); a key the model does not have is *unknown*;
  a key that did not come back is *missing*, unless the sites' privacy filter excludes it;
* every tensor has the shape and dtype the global model sent, and only finite values;
* the sample count (FedAvg's weight) is a finite number > 0, not above ``max_samples``, and not
  above the count the site reported in its first accepted update: a site's data does not grow
  during a run, so a jump is a bug or an attack on the average.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel


def _tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


class UpdateValidator(FLComponent):
    """Checks client updates against the global model of the round (see the module docstring).

    Args:
        max_samples: the largest plausible sample count (FedAvg weight) of one site.
        weight_key: where the sample count is in the update's meta (FedAvg's key by default).
        excluded_vars: the regular expression the sites' NVFlare ``ExcludeVars`` filter removes
            from their updates (matched with ``re.search``, as that filter does): such keys may be
            absent; any other missing key is still refused.
    """

    def __init__(self, max_samples: float = 1e7, weight_key: str = FLMetaKey.NUM_STEPS_CURRENT_ROUND, excluded_vars: str | None = None) -> None:
        super().__init__()
        if not max_samples > 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        self.max_samples = max_samples
        self.weight_key = weight_key
        self.excluded = re.compile(excluded_vars) if excluded_vars else None
        self.expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.model_keys: set[str] = set()
        self.first_counts: dict[str, float] = {}

    def expect(self, global_params: Mapping, model_keys: Iterable[str]) -> None:
        """The round's global model (what updates must match) and every key of the full model."""
        self.expected = {k: (tuple(_tensor(v).shape), _tensor(v).dtype) for k, v in global_params.items()}
        self.model_keys = set(model_keys)

    def check(self, site: str, update: FLModel) -> str | None:
        """Why ``update`` must be rejected, or None when it may be aggregated."""
        return self._check_keys(update.params or {}) or self._check_tensors(update.params) or self._check_weight(site, update.meta or {})

    def remember(self, site: str, update: FLModel) -> None:
        """Keep the sample count of a site's first accepted update: later ones may not exceed it."""
        self.first_counts.setdefault(site, float((update.meta or {})[self.weight_key]))

    def _check_keys(self, params: Mapping) -> str | None:
        extra = sorted(set(params) - set(self.expected))
        if extra:
            frozen = [k for k in extra if k in self.model_keys]
            if frozen:
                return f"key {frozen[0]} is frozen: the model has it but does not exchange it ({len(extra)} keys outside the exchanged set)"
            return f"unknown key {extra[0]}: not in the model ({len(extra)} keys outside the exchanged set)"
        missing = sorted(k for k in set(self.expected) - set(params) if not (self.excluded and self.excluded.search(k)))
        if missing:
            return f"{len(missing)} exchanged keys missing, e.g. {missing[0]}"
        return None

    def _check_tensors(self, params: Mapping) -> str | None:
        for key, (shape, dtype) in self.expected.items():
            if key not in params:
                continue  # excluded by the site's privacy filter (checked above)
            value = _tensor(params[key])
            if tuple(value.shape) != shape:
                return f"key {key}: shape {tuple(value.shape)}, the global model's is {shape}"
            if value.dtype != dtype:
                return f"key {key}: dtype {value.dtype}, the global model's is {dtype}"
            if value.is_floating_point() and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                return f"key {key}: {bad} non-finite values (NaN or Inf)"
        return None

    def _check_weight(self, site: str, meta: Mapping) -> str | None:
        value = meta.get(self.weight_key)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return f"sample count {value!r} is not a number"
        count = float(value)
        if not math.isfinite(count) or count <= 0:
            return f"sample count {value} is not a finite positive number"
        if count > self.max_samples:
            return f"sample count {value:g} is above the bound {self.max_samples:g} (max_samples)"
        first = self.first_counts.get(site)
        if first is not None and count > first:
            return f"sample count {value:g} is above the {first:g} the site reported in its first update"
        return None
