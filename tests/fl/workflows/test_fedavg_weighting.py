"""FedAvg weighting on hand-made updates: the weight is the client's training-sample count."""

import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.workflows.fedavg import FedAvg


def _update(value: float, samples: int, name: str) -> FLModel:
    """What BundleLearner.train returns: trainable params plus the sample count NVFlare weights by."""
    return FLModel(
        params={"w": torch.full((2, 2), value), "b": torch.tensor([value])},
        params_type=ParamsType.FULL,
        meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: samples, "num_train_samples": samples, "client_name": name},
    )


def test_fedavg_weights_updates_by_sample_count():
    """Drives NVFlare 2.9's FedAvg result callback (private API: pinned here on purpose)."""
    controller = FedAvg(num_clients=2, num_rounds=1, persistor_id="")
    controller.current_round, controller._received_count, controller._expected_count = 0, 0, 2
    controller._aggr_helper, controller._aggr_metrics_helper = WeightedAggregationHelper(), WeightedAggregationHelper()
    controller._all_metrics, controller._site_metric_weights = True, {}
    assert controller._aggregate_one_result(_update(1.0, 30, "site-1"))
    assert controller._aggregate_one_result(_update(5.0, 10, "site-2"))
    result = controller._get_aggregated_result()
    torch.testing.assert_close(torch.as_tensor(result.params["w"]), torch.full((2, 2), 0.75 * 1.0 + 0.25 * 5.0))
    torch.testing.assert_close(torch.as_tensor(result.params["b"]), torch.tensor([2.0]))
    weights = {w["name"]: w["weight"] for w in controller._site_metric_weights.values()}
    assert weights == {"site-1": 30.0, "site-2": 10.0}
