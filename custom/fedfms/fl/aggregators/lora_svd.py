"""LoRA aggregation of FLAP-SAM: average the low-rank updates, then re-factorise them by SVD.

Client k sends, for every LoRA layer, A_k (r, in) and B_k (out, r); its update is ΔW_k = B_k A_k.
The server forms the weighted average of the *products*, M = Σ_k w_k B_k A_k (weights normalised
to sum 1), and takes the truncated SVD M ≈ U_r S_r V_r^T to get the new global factors

    B = U_r  (orthonormal columns),   A = diag(S_r) V_r^T  (carries all the singular values).

Putting the whole spectrum into A leaves B an orthonormal basis of the update's column space:
A alone holds the scale of the update, and the next round's local training starts from an
orthonormal, well-conditioned B. Every other parameter is averaged with the same weights (FedAvg).

Averaging A and B separately would be wrong: Σ_k w_k B_k A_k ≠ (Σ_k w_k B_k)(Σ_k w_k A_k). The
cross terms w_j w_k B_j A_k mix factors of different clients, which live in unrelated bases (any
invertible R gives the same update B R⁻¹ · R A), so the result is not an average of the updates.

M can have rank up to K·r, but the model holds only rank r: truncation discards the singular
values beyond r, and that part of the clients' updates is lost. It is measured every round as
the relative error ||M - B A||_F / ||M||_F per layer (= sqrt(Σ_{i>r} s_i²) / ||M||_F), returned
with the parameters and logged by :class:`LoRASVDAggregator`.

Robust aggregation (``combine``: ``median`` or ``trimmed_mean``, :mod:`fedfms.fl.aggregators.robust`) is valid
here only on the products: the coordinate-wise median of the B_k A_k (and of every other tensor)
is re-factorised the same way. A median of the A_k and of the B_k taken separately would, like
their mean, combine factors that live in unrelated bases.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fedfms.fl.aggregators.robust import check_combine, restore, robust_combine

# <prefix>.lora_a_q.weight / .lora_b_v.weight (LoRAQKV) and <prefix>.lora_a.weight (LoRALinear)
_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<side>[ab])(?P<proj>_[qv])?\.weight$")


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Group LoRA parameter names into ``{layer: (A key, B key)}``; other keys are ignored.

    The layer is named by what its two keys share: ``<prefix>.lora_q`` / ``<prefix>.lora_v`` for
    the encoder's fused qkv (two LoRA pairs on one module), ``<prefix>.lora`` for a decoder projection.
    """
    halves: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _LORA_KEY.match(key)
        if match:
            layer = f"{match['prefix']}.lora{match['proj'] or ''}"
            halves.setdefault(layer, {})[match["side"]] = key
    lone = sorted(key for half in halves.values() if len(half) == 1 for key in half.values())
    if lone:
        raise ValueError(f"LoRA parameters without their A/B partner: {', '.join(lone)}")
    return {layer: (half["a"], half["b"]) for layer, half in halves.items()}


def refactorize(products: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factorisation B A of ``products`` (out, in) by truncated SVD.

    Returns A (rank, in) = diag(S_r) V_r^T, B (out, rank) = U_r and the relative truncation error
    ||M - B A||_F / ||M||_F (0 for M = 0). When ``rank`` exceeds min(out, in) the factors are
    zero-padded to keep the model's shapes: min(out, in) directions already represent M exactly.
    """
    if products.ndim != 2:
        raise ValueError(f"expected a 2D matrix of LoRA products, got shape {tuple(products.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    m = products.to(torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    b, a = u[:, :rank], s[:rank, None] * vh[:rank]
    norm = torch.linalg.matrix_norm(m)
    error = float(torch.linalg.matrix_norm(m - b @ a) / norm) if norm > 0 else 0.0
    pad = rank - s.numel()
    if pad > 0:
        b, a = F.pad(b, (0, pad)), F.pad(a, (0, 0, 0, pad))
    # contiguous: NVFlare streams tensors through safetensors, which refuses strided views
    return a.to(products.dtype).contiguous(), b.to(products.dtype).contiguous(), error


class _WeightedSum:
    """Running Σ_k w_k x_k over clients, in float64: for LoRA layers x is the product B_k A_k, else the tensor.

    Memory is one float64 copy of every non-LoRA tensor plus one (out, in) matrix per LoRA layer,
    whatever the number of clients. The first client fixes the layout (keys, shapes, dtypes and
    whether values are NumPy arrays, as NVFlare's default NUMPY exchange format delivers them);
    results are returned in that layout.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total_weight = 0.0
        self._layout: dict[str, tuple[torch.Size, torch.dtype, bool]] = {}
        self._pairs: dict[str, tuple[str, str]] = {}
        self._products: dict[str, torch.Tensor] = {}
        self._others: dict[str, torch.Tensor] = {}

    def add(self, params: Mapping[str, Any], weight: float) -> None:
        """Add one client's parameters; validates everything first so a rejected client changes nothing."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"client weight must be a positive finite number, got {weight}")
        tensors = {key: torch.as_tensor(value) for key, value in params.items()}
        layout = {key: (t.shape, t.dtype, isinstance(params[key], np.ndarray)) for key, t in tensors.items()}
        if self.count == 0:
            self._pairs = _checked_pairs(tensors)
            self._layout = layout
        else:
            self._check_matches(layout)
        for layer, (a_key, b_key) in self._pairs.items():
            product = tensors[b_key].to(torch.float64) @ tensors[a_key].to(torch.float64)
            self._add_value(self._products, layer, product, weight)
        paired = {key for pair in self._pairs.values() for key in pair}
        for key, tensor in tensors.items():
            if key not in paired:
                self._add_value(self._others, key, tensor.to(torch.float64), weight)
        self.count += 1
        self.total_weight += weight

    def result(self, rank: int | None) -> tuple[dict[str, Any], dict[str, float]]:
        """The combined values, LoRA layers re-factorised to ``rank`` (default: the incoming A's rank)."""
        averaged = {key: self._combined(total) for key, total in self._others.items()}
        errors: dict[str, float] = {}
        for layer, (a_key, b_key) in self._pairs.items():
            product = self._combined(self._products[layer])
            averaged[a_key], averaged[b_key], errors[layer] = refactorize(product, rank or self._layout[a_key][0][0])
        params = {key: restore(averaged[key], dtype, as_numpy) for key, (_, dtype, as_numpy) in self._layout.items()}
        return params, errors

    def _add_value(self, sums: dict[str, torch.Tensor], key: str, value: torch.Tensor, weight: float) -> None:
        if key in sums:
            sums[key].add_(value, alpha=weight)
        else:
            sums[key] = value * weight

    def _combined(self, total: torch.Tensor) -> torch.Tensor:
        return total / self.total_weight

    def _check_matches(self, layout: dict[str, tuple[torch.Size, torch.dtype, bool]]) -> None:
        missing, extra = sorted(self._layout.keys() - layout.keys()), sorted(layout.keys() - self._layout.keys())
        if missing or extra:
            raise ValueError(f"parameter keys differ from the first client's: missing {missing}, unexpected {extra}")
        shapes = {key: (layout[key][0], shape) for key, (shape, _, _) in self._layout.items()}
        wrong = [f"{key} {tuple(got)} != {tuple(want)}" for key, (got, want) in shapes.items() if got != want]
        if wrong:
            raise ValueError(f"parameter shapes differ from the first client's: {'; '.join(wrong)}")


class _RobustCombination(_WeightedSum):
    """Keeps every client's values (LoRA products and other tensors) and combines them by a robust rule, unweighted."""

    def __init__(self, combine: str, trim_fraction: float) -> None:
        super().__init__()
        self.combine, self.trim_fraction = combine, trim_fraction

    def _add_value(self, values: dict[str, list], key: str, value: torch.Tensor, weight: float) -> None:
        values.setdefault(key, []).append(value)

    def _combined(self, values: list[torch.Tensor]) -> torch.Tensor:
        return robust_combine(values, self.combine, self.trim_fraction)


def _checked_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    pairs = lora_pairs(tensors)
    for a_key, b_key in pairs.values():
        a, b = tensors[a_key], tensors[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA factors do not multiply: {b_key} {tuple(b.shape)} @ {a_key} {tuple(a.shape)}")
    return pairs


def aggregate_lora(
    updates: list[tuple[Mapping[str, Any], float]], rank: int | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    """Aggregate ``[(params, weight), ...]``: LoRA layers by SVD of the averaged products, the rest by FedAvg.

    Weights (e.g. sample counts) are normalised to sum 1. ``rank`` defaults to each layer's incoming
    rank. All clients must send the same keys and shapes. Returns the new parameters (same dtypes
    and tensor/NumPy type as received) and the relative truncation error per LoRA layer.
    """
    if not updates:
        raise ValueError("no client updates to aggregate")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    total = _WeightedSum()
    for params, weight in updates:
        total.add(params, weight)
    return total.result(rank)


class LoRASVDAggregator(ModelAggregator):
    """FLAP-SAM LoRA aggregation for NVFlare's ``FedAvg(aggregator=...)``, streaming client by client.

    ``FedAvg`` (NVFlare 2.9) calls ``reset_stats()`` at the start of each round, ``accept_model(result)``
    as each client result arrives, and ``aggregate_model()`` once all have arrived. A client's weight
    is ``meta[weight_key]`` (default ``NUM_STEPS_CURRENT_ROUND``, as FedAvg's built-in aggregation;
    ``FedAvg(aggregation_weights=...)`` does not apply to custom aggregators), 1.0 with a warning when
    missing or unusable.

    Only FULL parameters are accepted: a DIFF would be averaged as if it were weights
    (``ResumableFedAvg`` turns sites' weight changes into weights first, see ``needs_full_params``). Rejection
    raises (after logging an error) because FedAvg ignores ``accept_model``'s return value; its
    result callback catches the exception, logs it and marks the contribution as not accepted.
    A round with no accepted client raises in ``aggregate_model`` so that the run fails loudly
    instead of replacing the global model with nothing.

    ``combine`` = ``median`` or ``trimmed_mean`` (with ``trim_fraction``) replaces the weighted mean
    of the products and other tensors by that robust rule (unweighted; every client's values are
    kept until the round ends).
    """

    needs_full_params = True  # the LoRA products are formed from the weights themselves

    def __init__(
        self, rank: int | None = None, weight_key: str = FLMetaKey.NUM_STEPS_CURRENT_ROUND, combine: str = "mean", trim_fraction: float = 0.2
    ) -> None:
        super().__init__()
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        check_combine(combine, trim_fraction)
        self.rank = rank
        self.weight_key = weight_key
        self.combine = combine
        self.trim_fraction = trim_fraction
        self.weighted = combine == "mean"  # robust rules ignore the sample counts
        self.reset_stats()

    def accept_model(self, model: FLModel) -> None:
        client = (model.meta or {}).get("client_name", "unknown client")
        try:
            if model.params_type != ParamsType.FULL:
                raise ValueError(f"params_type is {model.params_type}, but LoRA SVD aggregation needs FULL parameters")
            self._sum.add(model.params, self._weight(model, client))
        except ValueError as e:
            self.error(f"Rejected the model from {client}: {e}")
            raise

    def aggregate_model(self) -> FLModel:
        try:
            if self._sum.count == 0:
                raise RuntimeError("no client model was accepted this round; nothing to aggregate")
            count = self._sum.count
            params, errors = self._sum.result(self.rank)
        finally:
            self.reset_stats()
        max_error = max(errors.values(), default=0.0)
        by = "" if self.combine == "mean" else f" by coordinate-wise {self.combine} of the products"
        if errors:
            worst = max(errors, key=errors.get)
            self.info(
                f"LoRA SVD aggregation{by} of {count} clients over {len(errors)} layers: relative truncation error "
                f"max {max_error:.3e} ({worst}), mean {sum(errors.values()) / len(errors):.3e}"
            )
        else:
            self.warning(f"LoRA SVD aggregation of {count} clients found no LoRA parameters: plain FedAvg only")
        return FLModel(
            params=params,
            params_type=ParamsType.FULL,
            meta={"lora_svd_relative_error": errors, "lora_svd_max_relative_error": max_error},
        )

    def reset_stats(self) -> None:
        self._sum = _WeightedSum() if self.combine == "mean" else _RobustCombination(self.combine, self.trim_fraction)

    def _weight(self, model: FLModel, client: str) -> float:
        value = (model.meta or {}).get(self.weight_key)
        try:
            weight = math.nan if value is None or isinstance(value, bool) else float(value)
        except (TypeError, ValueError, OverflowError):
            weight = math.nan
        if math.isfinite(weight) and weight > 0:
            return weight
        self.warning(f"{client} sent no usable {self.weight_key!r} in meta ({value!r}); weighting it 1.0")
        return 1.0
