"""The client's own checks on what it receives, without a simulator."""

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from torch import nn

from fedfms.errors import DataError
from fedfms.fl.executors.learner import BundleLearner
from fedfms.fl.site_settings import SETTINGS_ENV


def _learner() -> BundleLearner:
    learner = BundleLearner("bundles/unet_prostate")
    learner.network = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    learner.exchange_keys = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    learner.current_round = 3
    return learner


def _global(**changes) -> FLModel:
    params = {k: torch.full_like(v, 0.5) for k, v in _learner().network.state_dict().items() if k in _learner().exchange_keys}
    return FLModel(params={**params, **changes})


def test_a_global_model_with_non_finite_values_is_refused_and_not_loaded():
    learner = _learner()
    before = {k: v.clone() for k, v in learner.network.state_dict().items()}
    with pytest.raises(ValueError, match="refusing the global model of round 3: 1.running_var holds non-finite values"):
        learner._load_global(_global(**{"1.running_var": torch.tensor([1.0, float("inf")])}))
    assert all(torch.equal(learner.network.state_dict()[k], v) for k, v in before.items())


def test_the_global_model_loads_weights_and_statistics():
    learner = _learner()
    learner._load_global(_global())
    assert torch.equal(learner.network.state_dict()["1.running_mean"], torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        learner._load_global(_global(extra=torch.zeros(1)))


def test_the_unseen_site_refuses_training_and_validation():
    learner = _learner()
    learner.site_name, learner.datalist = "RUNMC", "unseen"
    before = {k: v.clone() for k, v in learner.network.state_dict().items()}
    with pytest.raises(RuntimeError, match="site RUNMC is the unseen site .* refuses train"):
        learner.train(_global())
    with pytest.raises(RuntimeError, match="refuses validation"):
        learner.validate(_global())
    assert all(torch.equal(learner.network.state_dict()[k], v) for k, v in before.items())  # nothing was loaded


def test_a_site_without_its_data_folder_is_told_where_to_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    learner = BundleLearner("bundles/unet_prostate", dataset_dir=str(tmp_path / "nowhere"))
    learner.site_name = "RUNMC"
    with pytest.raises(DataError, match=rf"nowhere: site RUNMC: no prepared data folder here \(dataset_dir, the job's\); set this site's dataset_dir in local/fedfms_site.json in the site's startup kit, or the file named by \${SETTINGS_ENV}"):
        learner._apply_site_settings()
