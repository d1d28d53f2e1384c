"""Robust aggregation: coordinate-wise median and trimmed mean, alone and on the LoRA products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedfms.fl.aggregators.lora_svd import LoRASVDAggregator
from fedfms.fl.aggregators.robust import RobustAggregator, robust_combine, trimmed_count
from tests.fl.aggregators.test_lora_svd import client, product


def _model(params: dict, weight: float = 10.0, kind: str = ParamsType.FULL) -> FLModel:
    return FLModel(params=params, params_type=kind, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: weight})


def test_median_and_trimmed_mean_per_coordinate():
    values = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, 20.0]), torch.tensor([3.0, 1e9]), torch.tensor([4.0, 30.0])]
    assert robust_combine(values, "median").tolist() == [2.5, 25.0]  # the mean of the two middle values
    assert robust_combine(values[:3], "median").tolist() == [2.0, 20.0]  # one outlier among three moves nothing
    assert robust_combine(values, "trimmed_mean", 0.25).tolist() == [2.5, 25.0]  # one dropped at each end
    assert (trimmed_count(3, 0.2), trimmed_count(5, 0.2), trimmed_count(10, 0.2), trimmed_count(2, 0.49)) == (0, 1, 2, 0)


def test_an_outlier_site_cannot_move_the_median_model():
    aggregator = RobustAggregator("median")
    honest = [{"w": torch.full((2, 2), v), "steps": torch.tensor(v, dtype=torch.int64)} for v in (1.0, 2.0, 3.0)]
    poisoned = {"w": torch.full((2, 2), 1e6), "steps": torch.tensor(7, dtype=torch.int64)}
    for params, weight in zip([*honest, poisoned], (10, 10, 10, 1e6)):
        aggregator.accept_model(_model(params, weight))
    result = aggregator.aggregate_model()
    assert torch.equal(result.params["w"], torch.full((2, 2), 2.5)) and result.params["steps"].dtype == torch.int64
    assert result.params_type == ParamsType.FULL and result.meta == {"aggregation": "median", "num_updates": 4}
    assert aggregator._updates == []  # reset for the next round


def test_numpy_updates_and_weight_differences_keep_their_kind(caplog):
    aggregator = RobustAggregator("trimmed_mean", trim_fraction=0.2)
    for v in (0.1, 0.2, 0.3):
        aggregator.accept_model(_model({"w": np.full(3, v, np.float32)}, kind=ParamsType.DIFF))
    result = aggregator.aggregate_model()  # three sites, 20 %: nothing to drop, an unweighted mean
    assert isinstance(result.params["w"], np.ndarray) and result.params["w"].dtype == np.float32
    np.testing.assert_allclose(result.params["w"], 0.2, rtol=1e-6)
    assert result.params_type == ParamsType.DIFF and "drops nothing: an unweighted mean" in caplog.text
    aggregator.accept_model(_model({"w": np.zeros(3, np.float32)}, kind=ParamsType.DIFF))
    with pytest.raises(ValueError, match="params_type .* differs"):
        aggregator.accept_model(_model({"w": np.zeros(3, np.float32)}))


def test_lora_median_is_taken_of_the_products_then_refactorised():
    updates = [client(1, bias=1.0), client(2, bias=2.0), client(3, bias=100.0)]
    aggregator = LoRASVDAggregator(combine="median", rank=6)
    for params in updates:
        aggregator.accept_model(_model(params))
    result = aggregator.aggregate_model()
    expected = torch.stack([product(u) for u in updates]).median(dim=0).values  # odd count: the middle value
    torch.testing.assert_close(product(result.params), expected)  # rank 6 >= min(6, 5): exact
    assert torch.equal(result.params["head.bias"], torch.full((3,), 2.0, dtype=torch.float64))
    assert not aggregator.weighted and LoRASVDAggregator().weighted


@pytest.mark.parametrize("options, message", [
    ({"combine": "mode"}, "unknown aggregation 'mode'"),
    ({"combine": "median", "trim_fraction": 0.5}, "trim_fraction must be in"),
])
def test_bad_robust_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LoRASVDAggregator(**options)
    with pytest.raises(ValueError, match="FedAvg's own aggregation is the mean"):
        RobustAggregator("mean")
