"""TrainableModelPersistor: trainable-only exchange, round bookkeeping, resume from a saved global model."""

import pytest
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from torch import nn

from fedfms.fl.persistors.trainable import COMPLETED_ROUNDS, TrainableModelPersistor


def _network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    network[0].requires_grad_(False)  # a frozen layer, as a foundation model's encoder
    return network


def _started(persistor: TrainableModelPersistor, app_root) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app_root), private=True, sticky=False)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    return fl_ctx


def test_exchanges_trainable_keys_and_saves_the_full_model_with_its_round(tmp_path):
    network = _network(0)
    persistor = TrainableModelPersistor(model=network)
    fl_ctx = _started(persistor, tmp_path)
    learnable = persistor.load_model(fl_ctx)
    assert set(learnable[ModelLearnableKey.WEIGHTS]) == {"1.weight", "1.bias"}
    update = {k: torch.full(v.shape, 7.0) for k, v in learnable[ModelLearnableKey.WEIGHTS].items()}
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 4, private=True, sticky=False)
    persistor.save_model(make_model_learnable(update, {}), fl_ctx)
    saved = torch.load(tmp_path / "FL_global_model.pt", weights_only=True)
    assert saved["meta_props"][COMPLETED_ROUNDS] == 5
    assert torch.equal(saved["model"]["1.weight"], torch.full((2, 3), 7.0))
    assert torch.equal(saved["model"]["0.weight"], network[0].weight)  # frozen part kept from the full model


def test_resume_from_starts_at_the_saved_weights_not_the_initial_ones(tmp_path):
    trained = _network(1)
    checkpoint = tmp_path / "saved" / "FL_global_model.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": trained.state_dict(), "meta_props": {COMPLETED_ROUNDS: 3}}, checkpoint)
    persistor = TrainableModelPersistor(model=_network(0), resume_from=str(checkpoint))
    (tmp_path / "app").mkdir()
    learnable = persistor.load_model(_started(persistor, tmp_path / "app"))
    assert learnable[ModelLearnableKey.META][COMPLETED_ROUNDS] == 3
    assert set(learnable[ModelLearnableKey.WEIGHTS]) == {"1.weight", "1.bias"}
    for name in ("1.weight", "1.bias"):
        assert torch.equal(torch.as_tensor(learnable[ModelLearnableKey.WEIGHTS][name]), trained.state_dict()[name])
    restarted = torch.load(tmp_path / "app" / "FL_global_model.pt", weights_only=True)  # this run's global model starts there
    assert restarted["meta_props"][COMPLETED_ROUNDS] == 3
    assert all(torch.equal(restarted["model"][k], v) for k, v in trained.state_dict().items())


def test_a_save_can_never_write_a_frozen_unknown_or_non_finite_value(tmp_path):
    network = _network(0)
    persistor = TrainableModelPersistor(model=network)
    fl_ctx = _started(persistor, tmp_path)
    learnable = persistor.load_model(fl_ctx)
    assert (tmp_path / "FL_global_model.pt").is_file()  # the run's global model exists from the start
    good = {k: torch.full(v.shape, 2.0) for k, v in learnable[ModelLearnableKey.WEIGHTS].items()}
    for bad, reason in (({**good, "0.weight": torch.zeros(3, 4)}, "keys outside the exchanged set, e.g. 0.weight"),
                        ({**good, "x.weight": torch.zeros(1)}, "keys outside the exchanged set, e.g. x.weight"),
                        ({**good, "1.bias": torch.tensor([0.0, float("nan")])}, "1.bias holds non-finite values")):
        with pytest.raises(ValueError, match=reason):
            persistor.save_model(make_model_learnable(bad, {}), fl_ctx)
    saved = torch.load(tmp_path / "FL_global_model.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in network.state_dict().items())  # still the initial model


def test_resume_from_an_earlier_app_folder_carries_its_best_model(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    torch.save({"model": _network(1).state_dict(), "meta_props": {COMPLETED_ROUNDS: 2}}, earlier / "FL_global_model.pt")
    torch.save({"model": _network(2).state_dict()}, earlier / "best_FL_global_model.pt")
    persistor = TrainableModelPersistor(model=_network(0), resume_from=str(earlier))
    (tmp_path / "app").mkdir()
    persistor.load_model(_started(persistor, tmp_path / "app"))
    best = torch.load(tmp_path / "app" / "best_FL_global_model.pt", weights_only=True)["model"]
    assert all(torch.equal(best[k], v) for k, v in _network(2).state_dict().items())


class _Shared(nn.Module):
    """A layer registered under two names, as DynUNet's ``skip_layers`` holds its down-sampling blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(2, 2)
        self.alias = self.block


def test_every_name_of_a_shared_tensor_is_saved_with_the_new_value(tmp_path):
    persistor = TrainableModelPersistor(model=_Shared())
    fl_ctx = _started(persistor, tmp_path)
    weights = persistor.load_model(fl_ctx)[ModelLearnableKey.WEIGHTS]
    assert set(weights) == {"block.weight", "block.bias"}  # one name travels
    update = {k: torch.full(v.shape, 3.0) for k, v in weights.items()}
    persistor.save_model(make_model_learnable(update, {}), fl_ctx)
    saved = torch.load(tmp_path / "FL_global_model.pt", weights_only=True)["model"]
    assert torch.equal(saved["alias.weight"], torch.full((2, 2), 3.0))  # loading the file cannot bring the old value back
    loaded = _Shared()
    loaded.load_state_dict(saved)
    assert torch.equal(loaded.block.weight, torch.full((2, 2), 3.0))


DEFERRED = {"path": "fedfms.bundle.bundle_network", "args": {"bundle_root": "bundles/unet_prostate", "config_files": ["train.json", "cpu_demo.json"]},
            "config_type": "dict"}


def test_a_deferred_bundle_network_is_built_when_the_run_starts(tmp_path):
    """The shipped jobs' model config: NVFlare's builder leaves it a dict, the persistor builds it at START_RUN."""
    from nvflare.fuel.utils.component_builder import ComponentBuilder

    from fedfms.bundle import bundle_network

    class Builder(ComponentBuilder):
        def get_module_scanner(self):
            return None

    assert Builder().is_class_config({k: v for k, v in DEFERRED.items() if k != "config_type"})
    assert not Builder().is_class_config(DEFERRED)  # not built while the server reads its configuration
    persistor = TrainableModelPersistor(model=dict(DEFERRED))
    assert isinstance(persistor.model, dict)
    fl_ctx = _started(persistor, tmp_path)
    expected = bundle_network(**DEFERRED["args"]).state_dict()
    assert persistor.model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in persistor.model.state_dict().items())  # seeded: the same initial model
    assert persistor.load_model(fl_ctx)[ModelLearnableKey.WEIGHTS]


@pytest.mark.parametrize("change, error", [
    ({"path": "subprocess.Popen"}, "must be one of fedfms.bundle.bundle_network"),
    ({"args": {"bundle_root": "bundles/no_such_bundle"}}, "no MONAI bundle here"),
    ({"args": {"bundle_root": "bundles/unet_prostate", "config_files": ["train.json", "missing.json"]}}, "does not have"),
])
def test_a_deferred_model_is_checked_when_the_job_starts(change, error):
    with pytest.raises(ValueError, match=error):
        TrainableModelPersistor(model={**DEFERRED, **change})
