"""The update checks, one reason each, without a simulator (the fault drills run them for real)."""

import math

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants

from fedfms.fl.checks.updates import UpdateValidator

GLOBAL = {"a.weight": np.zeros((2, 3), np.float32), "b.bias": np.zeros(3, np.float32)}
MODEL_KEYS = [*GLOBAL, "frozen.weight"]


def _validator(**options) -> UpdateValidator:
    validator = UpdateValidator(**options)
    validator.expect(GLOBAL, MODEL_KEYS)
    return validator


def _update(weight=10, **changes) -> FLModel:
    params = {k: torch.ones(v.shape) for k, v in GLOBAL.items()}
    params.update(changes)
    return FLModel(params={k: v for k, v in params.items() if v is not None}, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: weight})


@pytest.mark.parametrize("update, reason", [
    (_update(), None),
    (_update(**{"frozen.weight": torch.ones(1)}), "key frozen.weight is frozen"),
    (_update(**{"x.weight": torch.ones(1)}), "unknown key x.weight"),
    (_update(**{"b.bias": None}), "1 exchanged keys missing, e.g. b.bias"),
    (_update(**{"a.weight": torch.ones(3, 2)}), "key a.weight: shape (3, 2), the global model's is (2, 3)"),
    (_update(**{"b.bias": torch.ones(3, dtype=torch.float64)}), "key b.bias: dtype torch.float64"),
    (_update(**{"b.bias": torch.tensor([1.0, math.inf, math.nan])}), "key b.bias: 2 non-finite values"),
    (_update(weight=0), "sample count 0 is not a finite positive number"),
    (_update(weight=-5), "sample count -5 is not a finite positive number"),
    (_update(weight=math.nan), "sample count nan is not a finite positive number"),
    (_update(weight="10"), "sample count '10' is not a number"),
    (_update(weight=1e12), "sample count 1e+12 is above the bound 1e+07"),
])
def test_each_bad_update_gets_its_reason(update, reason):
    found = _validator().check("site-1", update)
    assert found == reason if reason is None else reason in found


def test_a_site_cannot_claim_more_samples_than_it_first_reported():
    validator = _validator()
    first = _update(weight=10)
    assert validator.check("site-1", first) is None
    validator.remember("site-1", first)
    assert validator.check("site-1", _update(weight=10)) is None and validator.check("site-2", _update(weight=50)) is None
    assert "above the 10 the site reported in its first update" in validator.check("site-1", _update(weight=11))


def test_keys_the_sites_privacy_filter_excludes_may_be_absent():
    validator = _validator(excluded_vars=r"^b\.")
    assert validator.check("site-1", _update(**{"b.bias": None})) is None
    assert "missing" in _validator(excluded_vars=r"^b\.").check("site-1", _update(**{"a.weight": None}))


def test_a_finite_but_huge_value_is_refused_with_the_bound():
    assert "a value of magnitude 1e+06, above the bound 10000 (max_abs_value)" in _validator().check("site-1", _update(**{"b.bias": torch.full((3,), 1e6)}))
    assert _validator(max_abs_value=None).check("site-1", _update(**{"b.bias": torch.full((3,), 1e6)})) is None


def test_the_change_against_the_global_model_is_measured():
    validator = _validator()
    assert validator.check("site-1", _update()) is None
    assert validator.round_norms["site-1"] == pytest.approx(3.0)  # nine ones against the global model's zeros


def test_an_absolute_change_bound_refuses_a_larger_change():
    validator = _validator(max_change_norm=2.5)
    reason = validator.check("site-1", _update())
    assert "change norm 3 against the global model is above the bound 2.5 (max_change_norm)" in reason
    diff = FLModel(params={k: torch.full(v.shape, 0.1) for k, v in GLOBAL.items()}, params_type=ParamsType.DIFF, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 5})
    assert validator.check("site-2", diff) is None and validator.round_norms["site-2"] == pytest.approx(0.3)  # a DIFF is the change itself


def test_a_change_far_above_the_other_sites_median_is_refused():
    validator = _validator()
    norms = {"site-1": 1.0, "site-2": 1.2, "site-3": 30.0}
    refused = validator.check_round(norms)
    assert list(refused) == ["site-3"] and "is 27.3 times the median 1.1 of the other sites' changes" in refused["site-3"]
    assert validator.check_round({"site-1": 1.0, "site-2": 9.0}) == {}  # within 10 times
    assert validator.check_round({"site-1": 5.0}) == {}  # nothing to compare with
    assert validator.check_round({"site-1": 0.0, "site-2": 3.0}) == {}  # no change elsewhere: no ratio
    assert _validator(max_change_ratio=None).check_round(norms) == {}


def test_the_first_sample_counts_survive_a_restart():
    validator = _validator()
    validator.remember("site-1", _update(weight=10))
    restored = _validator()
    restored.restore(validator.state())
    assert "above the 10 the site reported in its first update" in restored.check("site-1", _update(weight=11))
    restored.restore(None)
    assert restored.check("site-1", _update(weight=11)) is None


@pytest.mark.parametrize("options", [{"max_abs_value": 0}, {"max_change_norm": -1}, {"max_change_ratio": 0.5}])
def test_bounds_must_make_sense(options):
    with pytest.raises(ValueError):
        UpdateValidator(**options)


def _with_controls(controls) -> FLModel:
    update = _update()
    if controls is not None:
        update.meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = controls
    return update


CONTROLS = {"a.weight": np.zeros((2, 3), np.float32)}  # SCAFFOLD: the trainable weights (b.bias a statistic here)


@pytest.mark.parametrize("controls, reason", [
    (CONTROLS, None),
    (None, "no SCAFFOLD control change in the update's meta"),
    ({}, "SCAFFOLD control change: 1 keys differ from the controlled weights, e.g. a.weight"),
    ({**CONTROLS, "b.bias": np.zeros(3, np.float32)}, "1 keys differ from the controlled weights, e.g. b.bias"),
    ({"a.weight": np.zeros((3, 2), np.float32)}, "SCAFFOLD control change of a.weight: shape (3, 2), the weight's is (2, 3)"),
    ({"a.weight": np.full((2, 3), np.nan, np.float32)}, "SCAFFOLD control change of a.weight: values that are not finite"),
    ({"a.weight": np.full((2, 3), 1e6, np.float32)}, "SCAFFOLD control change of a.weight: a value of magnitude 1e+06, above the bound 10000"),
])
def test_scaffold_control_changes_are_checked_like_the_weights(controls, reason):
    validator = _validator()
    validator.expect_controls({k: v.shape for k, v in CONTROLS.items()})
    found = validator.check("site-1", _with_controls(controls))
    assert found == reason if reason is None else reason in found
    assert _validator().check("site-1", _with_controls(None)) is None  # without SCAFFOLD no controls are asked for
