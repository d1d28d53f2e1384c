"""FinalEvaluation's table from the sites' answers: every TEST_METRICS column, NaN as null, averages over defined values."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable

from fedfms.bundle import TEST_METRICS
from fedfms.fl.widgets.recorder import ContributionRecorder
from fedfms.fl.workflows.final_eval import COLUMNS, FinalEvaluation

# site-1 has no empty test slice (fp_rate_empty NaN), site-2 no volume with an HD95, site-3 does not answer.
SCORES = {
    "site-1": {"dice_2d": 0.8, "iou_2d": 0.7, "dice_3d": 0.9, "dice_2d_fg": 0.8, "fp_rate_empty": math.nan, "hd95_3d": 3.0},
    "site-2": {"dice_2d": 0.4, "iou_2d": 0.3, "dice_3d": 0.5, "dice_2d_fg": 0.6, "fp_rate_empty": 0.25, "hd95_3d": math.nan},
}


def run_final_evaluation(tmp_path, monkeypatch) -> list[dict]:
    """FinalEvaluation.run with the server's engine, persistor and task collection replaced by stand-ins."""
    controller = FinalEvaluation(task_timeout=5)
    controller.fl_ctx = FLContext()
    controller.fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=False)
    controller.engine = SimpleNamespace(
        get_clients=lambda: [SimpleNamespace(name=s) for s in ("site-1", "site-2", "site-3")], get_component=lambda component_id: None
    )
    controller.persistor = SimpleNamespace(final_model=lambda fl_ctx: make_model_learnable({"w": np.zeros(1)}, {}), norm_statistics="global")
    answers = [FLModel(metrics=dict(m), meta={"client_name": s}) for s, m in SCORES.items()]
    monkeypatch.setattr(controller, "_collect", lambda targets, model: answers)
    controller.run()
    return json.loads((tmp_path / "final_test.json").read_text())


def test_rows_carry_every_metric_and_average_the_defined_values(tmp_path, monkeypatch):
    rows = {r["site"]: r for r in run_final_evaluation(tmp_path, monkeypatch)}
    assert list(rows) == ["site-1", "site-2", "site-3", "average"]
    assert rows["site-1"]["fp_rate_empty"] is None and rows["site-2"]["hd95_3d"] is None  # JSON has no NaN
    assert rows["site-1"]["hd95_3d"] == 3.0 and rows["site-2"]["fp_rate_empty"] == 0.25
    assert "did not answer" in rows["site-3"]["note"]
    average = rows["average"]
    assert {k: average[k] for k in TEST_METRICS} == pytest.approx(
        {"dice_2d": 0.6, "iou_2d": 0.5, "dice_3d": 0.7, "dice_2d_fg": 0.7, "fp_rate_empty": 0.25, "hd95_3d": 3.0}
    )
    assert average["note"] == "2 of 3 sites"


def test_csv_has_the_new_columns_after_the_old_ones(tmp_path, monkeypatch):
    run_final_evaluation(tmp_path, monkeypatch)
    with open(tmp_path / "final_test.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert COLUMNS == ("site", "dice_2d", "iou_2d", "dice_3d", "dice_2d_fg", "fp_rate_empty", "hd95_3d", "note")
    assert list(table[0]) == list(COLUMNS)
    assert (table[0]["fp_rate_empty"], table[1]["hd95_3d"], table[3]["hd95_3d"]) == ("", "", "3.0")


def _evaluate_with_selector(tmp_path, monkeypatch, val_scores: dict, best_so_far: float):
    """FinalEvaluation.run with a real ResumableModelSelector whose best of the rounds is ``best_so_far``."""
    from fedfms.fl.widgets.selector import BEST, ResumableModelSelector

    selector = ResumableModelSelector(key_metric="val_mean_dice", weigh_by_local_iter=True)
    selector.folder, selector.best_val_metric = tmp_path, best_so_far
    (tmp_path / BEST).write_text(json.dumps({"round": 1, "metric": best_so_far}))
    recorder = ContributionRecorder()
    recorder.rows = [{"round": 2, "site": s, "status": "accepted", "reason": None, "accepted": True, "num_train_samples": n}
                     for s, n in (("site-1", 30.0), ("site-2", 10.0))]
    components = {"model_selector": selector, "contributions": recorder}
    kept = []
    controller = FinalEvaluation(task_timeout=5)
    controller.fl_ctx = FLContext()
    controller.fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=False)
    controller.engine = SimpleNamespace(get_clients=lambda: [SimpleNamespace(name=s) for s in SCORES], get_component=components.get)
    final = make_model_learnable({"w": np.zeros(1)}, {"completed_rounds": 3})
    controller.persistor = SimpleNamespace(final_model=lambda fl_ctx: final, norm_statistics="global", keep_final_as_best=lambda: kept.append(True))
    answers = [FLModel(metrics={**SCORES[s], "val_mean_dice": v}, meta={"client_name": s}) for s, v in val_scores.items()]
    monkeypatch.setattr(controller, "_collect", lambda targets, model: answers)
    controller.run()
    return json.loads((tmp_path / BEST).read_text()), kept


def test_a_final_model_that_beats_the_rounds_best_becomes_the_best_model(tmp_path, monkeypatch):
    best, kept = _evaluate_with_selector(tmp_path, monkeypatch, {"site-1": 0.8, "site-2": 0.4}, best_so_far=0.6)
    assert kept == [True]  # the persistor copied the final model over the best one
    assert best["round"] == 3 and best["metric"] == pytest.approx(0.7)  # (30 x 0.8 + 10 x 0.4) / 40, as the rounds weigh
    assert best["final_model"] == {"round": 3, "metric": pytest.approx(0.7), "sites": {"site-1": 0.8, "site-2": 0.4}}


def test_a_final_model_below_the_rounds_best_leaves_the_best_model(tmp_path, monkeypatch):
    best, kept = _evaluate_with_selector(tmp_path, monkeypatch, {"site-1": 0.5, "site-2": 0.9}, best_so_far=0.65)
    assert kept == []
    assert (best["round"], best["metric"]) == (1, 0.65) and best["final_model"]["metric"] == pytest.approx(0.6)
