"""Every client update is checked before it can touch the global model.

NVFlare's built-in aggregation adds a result key by key and turns weights that are not finite and
positive into 1.0, so a bad update is half-added or silently re-weighted. :class:`UpdateValidator`
is asked first, by the FedAvg workflow (:class:`fedfms.fl.workflows.fedavg.ResumableFedAvg`), and a bad
update is rejected whole, with the reason:

* a compressed update the server could not read back (its decompression filter marked it with
  :data:`~fedfms.fl.filters.compression.PAYLOAD_ERROR`: missing block scales, wrong metadata);
* keys: exactly those of the global model sent this round. A key the model has but does not
  exchange is *frozen* (a site must not overwrite it); a key the model does not have is *unknown*;
  a key that did not come back is *missing*, unless the sites' privacy filter excludes it;
* every tensor has the shape and dtype the global model sent, only finite values, and no value
  larger in magnitude than ``max_abs_value`` (trained weights of a network fed [0, 1] images stay
  far below it; an update scaled by 1e6 does not);
* the update's change against the global model (its L2 norm over the floating tensors; the update
  itself when a site sends weight differences) is at most ``max_change_norm``, when set, and at most
  ``max_change_ratio`` times the median change of the other sites in the same round (checked by
  :meth:`UpdateValidator.check_round` once the round's updates are in: the first checks cannot
  know the others);
* under SCAFFOLD (:meth:`UpdateValidator.expect_controls`), the change of the site's control
  variates in the update's meta has exactly the controlled keys, their shapes, only finite values
  and none above ``max_abs_value``;
* the sample count (FedAvg's weight) is a finite number > 0, not above ``max_samples``, and not
  above the count the site reported in its first accepted update: a site's data does not grow
  during a run, so a jump is a bug or an attack on the average.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants

from fedfms.fl.filters.compression import PAYLOAD_ERROR


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
        max_abs_value: the largest magnitude any value of an update may have (None: no bound).
        max_change_norm: the largest L2 norm of an update's change against the global model
            (None: no absolute bound; its scale depends on the model, the learning rate and the
            local steps, so set it from the ``change_norm`` column of an honest run's records).
        max_change_ratio: the largest ratio of an update's change norm to the median change norm of
            the other sites that answered in the same round (None: no relative bound). Honest sites
            differ by their data (more local steps, larger change); the records' ``change_norm``
            column shows by how much.
    """

    def __init__(
        self,
        max_samples: float = 1e7,
        weight_key: str = FLMetaKey.NUM_STEPS_CURRENT_ROUND,
        excluded_vars: str | None = None,
        max_abs_value: float | None = 1e4,
        max_change_norm: float | None = None,
        max_change_ratio: float | None = 10.0,
    ) -> None:
        super().__init__()
        for name, bound in (("max_samples", max_samples), ("max_abs_value", max_abs_value), ("max_change_norm", max_change_norm)):
            if bound is not None and not bound > 0:
                raise ValueError(f"{name} must be positive, got {bound}")
        if max_change_ratio is not None and not max_change_ratio >= 1:
            raise ValueError(f"max_change_ratio must be at least 1, got {max_change_ratio}")
        self.max_samples = max_samples
        self.weight_key = weight_key
        self.excluded = re.compile(excluded_vars) if excluded_vars else None
        self.max_abs_value = max_abs_value
        self.max_change_norm = max_change_norm
        self.max_change_ratio = max_change_ratio
        self.expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.reference: dict[str, torch.Tensor] = {}
        self.model_keys: set[str] = set()
        self.first_counts: dict[str, float] = {}
        self.round_norms: dict[str, float] = {}  # this round: site -> change norm of its update, once it passed the other checks
        self.control_shapes: dict[str, tuple[int, ...]] = {}  # SCAFFOLD: the keys and shapes of the control changes

    def expect_controls(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Updates must carry SCAFFOLD control changes of these keys and shapes (after :meth:`expect`, every round)."""
        self.control_shapes = {k: tuple(v) for k, v in shapes.items()}

    def expect(self, global_params: Mapping, model_keys: Iterable[str]) -> None:
        """The round's global model (what updates must match, and what their change is measured from) and every key of the full model."""
        self.reference = {k: _tensor(v) for k, v in global_params.items()}
        self.expected = {k: (tuple(v.shape), v.dtype) for k, v in self.reference.items()}
        self.model_keys = set(model_keys)
        self.round_norms = {}

    def check(self, site: str, update: FLModel) -> str | None:
        """Why ``update`` must be rejected, or None when it may be aggregated."""
        payload_error = (update.meta or {}).get(PAYLOAD_ERROR)
        if payload_error:
            return f"compressed payload cannot be read back: {payload_error}"
        reason = self._check_keys(update.params or {}) or self._check_tensors(update.params) or self._check_weight(site, update.meta or {})
        reason = reason or self._check_controls(update.meta or {})
        if reason:
            return reason
        self.round_norms[site] = self.change_norm(update)
        return self._check_change(self.round_norms[site])

    def change_norm(self, update: FLModel) -> float:
        """L2 norm of the update's change against the round's global model, over its floating tensors."""
        diff = update.params_type == ParamsType.DIFF
        total = 0.0
        for key, value in (update.params or {}).items():
            value = _tensor(value)
            if key in self.reference and value.is_floating_point():
                change = value.double() if diff else value.double() - self.reference[key].double()
                total += float(change.square().sum())
        return math.sqrt(total)

    def check_round(self, norms: Mapping[str, float]) -> dict[str, str]:
        """The sites whose change norm (``{site: norm}``, the round's checked updates) is too far above the others', with the reason."""
        if self.max_change_ratio is None or len(norms) < 2:
            return {}
        refused = {}
        for site, norm in norms.items():
            median = statistics.median(n for s, n in norms.items() if s != site)
            if median > 0 and norm > self.max_change_ratio * median:  # (no change elsewhere: nothing to compare with)
                refused[site] = (
                    f"change norm {norm:.4g} is {norm / median:.3g} times the median {median:.4g} of the other sites' changes this round, "
                    f"above the bound {self.max_change_ratio:g} (max_change_ratio)"
                )
        return refused

    def remember(self, site: str, update: FLModel) -> None:
        """Keep the sample count of a site's first accepted update: later ones may not exceed it."""
        self.first_counts.setdefault(site, float((update.meta or {})[self.weight_key]))

    def state(self) -> dict:
        """What must survive a restart of the server: each site's first sample count."""
        return {"first_counts": dict(self.first_counts)}

    def restore(self, state: Mapping | None) -> None:
        """Continue with the state an earlier run saved (:meth:`state`)."""
        self.first_counts = {str(k): float(v) for k, v in (state or {}).get("first_counts", {}).items()}

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
            if self.max_abs_value is not None and value.numel() and value.is_floating_point():
                largest = float(value.abs().max())
                if largest > self.max_abs_value:
                    return f"key {key}: a value of magnitude {largest:.4g}, above the bound {self.max_abs_value:g} (max_abs_value)"
        return None

    def _check_controls(self, meta: Mapping) -> str | None:
        if not self.control_shapes:
            return None
        controls = meta.get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF)
        if not isinstance(controls, Mapping):
            return f"no SCAFFOLD control change in the update's meta ({AlgorithmConstants.SCAFFOLD_CTRL_DIFF})"
        if set(controls) != set(self.control_shapes):
            odd = sorted(set(controls) ^ set(self.control_shapes))
            return f"SCAFFOLD control change: {len(odd)} keys differ from the controlled weights, e.g. {odd[0]}"
        for key, shape in self.control_shapes.items():
            value = _tensor(controls[key])
            if tuple(value.shape) != shape:
                return f"SCAFFOLD control change of {key}: shape {tuple(value.shape)}, the weight's is {shape}"
            if not value.is_floating_point() or not torch.isfinite(value).all():
                return f"SCAFFOLD control change of {key}: values that are not finite floating-point numbers"
            if self.max_abs_value is not None and value.numel() and float(value.abs().max()) > self.max_abs_value:
                return f"SCAFFOLD control change of {key}: a value of magnitude {float(value.abs().max()):.4g}, above the bound {self.max_abs_value:g} (max_abs_value)"
        return None

    def _check_change(self, norm: float) -> str | None:
        if self.max_change_norm is not None and norm > self.max_change_norm:
            return f"change norm {norm:.4g} against the global model is above the bound {self.max_change_norm:g} (max_change_norm)"
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
