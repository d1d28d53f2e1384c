"""What a cell process reads from a federated run's records, and how it chooses and keeps the qualitative slices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedfms.experiment.cell import average, bundle_overrides, federated_rows, json_safe, largest_label_slices, network_overrides, round_records, training_sites
from fedfms.errors import DataError
from tests.experiment.conftest import metrics


def app_folder(tmp_path, status="completed", final=True, reason=""):
    app = tmp_path / "app_server"
    app.mkdir()
    (app / "run_status.json").write_text(json.dumps({"status": status, "reason": reason}))
    rows = [
        {"round": 0, "site": "A", "status": "accepted", "bytes_received": 100, "global_val_dice": 0.2, "wire_bytes_down": 130, "wire_bytes_up": 120},
        {"round": 0, "site": "B", "status": "accepted", "bytes_received": 100, "global_val_dice": 0.4, "wire_bytes_down": 130, "wire_bytes_up": 124},
        {"round": 1, "site": "A", "status": "accepted", "bytes_received": 100, "global_val_dice": 0.6},
        {"round": 1, "site": "B", "status": "rejected", "bytes_received": 300, "global_val_dice": 0.8},
        {"round": 2, "site": "A", "status": "timed_out", "bytes_received": 0, "global_val_dice": None},
    ]
    (app / "round_metrics.json").write_text(json.dumps(rows))
    if final:
        final_rows = [{"site": "A", **metrics(0.5), "note": None}, {"site": "B", **metrics(0.7), "note": None},
                      {"site": "average", **metrics(0.6), "note": "2 of 2 sites"},
                      {"site": "unseen:C", **metrics(0.3), "note": "never trained"}]
        (app / "final_test.json").write_text(json.dumps(final_rows))
    return app


def test_round_records(tmp_path):
    records = round_records(app_folder(tmp_path))
    assert records["rounds"] == [{"round": 0, "mean_global_val_dice": pytest.approx(0.3), "sites": 2},
                                 {"round": 1, "mean_global_val_dice": pytest.approx(0.7), "sites": 2}]
    assert records["bytes_per_round"] == 100  # accepted contributions only
    assert records["wire_bytes_up_per_round"] == 122 and records["wire_bytes_down_per_round"] == 130  # measured where a row has it
    assert records["bytes_total"] == 600 and records["contributions"] == {"accepted": 3, "rejected": 1, "timed_out": 1}


def test_federated_rows_of_a_completed_run(tmp_path):
    rows = federated_rows(app_folder(tmp_path), 0, ["A", "B"], "C")
    assert set(rows) == {"A", "B", "unseen:C"} and rows["unseen:C"]["dice_2d"] == 0.3 and "note" not in rows["A"]


@pytest.mark.parametrize(
    ("status", "final", "sites", "message"),
    [
        ("ended_early", True, ["A", "B"], r"did not complete: ended_early: too few updates"),
        ("completed", False, ["A", "B"], r"no final test table .*final_test.json"),
        ("completed", True, ["A", "D"], r"the final global model was not scored at D \(D: no row"),
    ],
)
def test_federated_runs_are_judged_by_their_records_not_the_exit_code(tmp_path, status, final, sites, message):
    app = app_folder(tmp_path, status, final, reason="too few updates")
    with pytest.raises(RuntimeError, match=message):
        federated_rows(app, 0, sites, None)


def test_a_run_that_stopped_before_fedavg_ended(tmp_path):
    with pytest.raises(RuntimeError, match="stopped before FedAvg ended .*exited with 1"):
        federated_rows(tmp_path, 1, ["A"], None)


def test_average_over_the_sites_where_defined():
    sites = {"A": {**metrics(0.4), "fp_rate_empty": None}, "B": {**metrics(0.8), "hd95_3d": float("nan")}}
    means = average(sites)
    assert means["dice_2d"] == pytest.approx(0.6) and means["fp_rate_empty"] == 0.1 and means["hd95_3d"] == 3.0
    assert average({"A": {**metrics(0.4), "fp_rate_empty": None}})["fp_rate_empty"] is None
    assert json_safe({"a": [math.nan, 1.0, math.inf], "b": {"c": -math.inf}}) == {"a": [None, 1.0, None], "b": {"c": None}}


def test_largest_label_slices_are_chosen_deterministically(tmp_path):
    samples = []
    for case, slice_, area in [("c1", 0, 4), ("c1", 1, 9), ("c2", 0, 9), ("c2", 1, 0), ("c3", 4, 16)]:
        label = np.zeros((5, 8, 8), np.uint8)  # a stack: the centre label counts
        side = int(area ** 0.5)
        label[2, :side, :side] = 1
        label[0] = 1
        np.save(tmp_path / f"{case}_{slice_}.npy", label)
        samples.append({"label": str(tmp_path / f"{case}_{slice_}.npy"), "case": case, "slice": slice_})
    chosen = largest_label_slices(list(reversed(samples)), 3)
    assert [(s["case"], s["slice"]) for s in chosen] == [("c3", 4), ("c1", 1), ("c2", 0)]


def base_cell(**values) -> dict:
    cell = {"model": "sam", "strategy": "msa", "size": "tiny", "image_size": None, "pretrained": True, "pretrained_checkpoint": None,
            "data": "/nowhere", "partition": "partitions/natural", "sites": None}
    return {**cell, **values}


def test_network_overrides_choose_the_same_network_as_fedfms_job():
    assert network_overrides(base_cell()) == {"strategy": "msa", "size": "tiny"}
    assert network_overrides(base_cell(pretrained=False))["pretrained_checkpoint"] == "scratch"
    assert network_overrides(base_cell(pretrained_checkpoint="/m/sam.pth", image_size=224)) == {
        "strategy": "msa", "size": "tiny", "image_size": 224, "pretrained_checkpoint": "/m/sam.pth"}
    assert network_overrides(base_cell(model="unet")) == {}


def test_bundle_overrides_add_the_experiment_overrides_under_the_cell_choices():
    cell = base_cell(seed=2, device=None, overrides={"train#samples_per_epoch": 8, "seed": 9, "learning_rate": 0.1})
    assert bundle_overrides(cell) == {"train#samples_per_epoch": 8, "learning_rate": 0.1, "seed": 2, "dataset_dir": "/nowhere",
                                      "datalist_dir": "partitions/natural", "strategy": "msa", "size": "tiny"}


def test_training_sites_name_the_missing_data(tmp_path):
    with pytest.raises(DataError, match="no prepared data folder here"):
        training_sites(base_cell(data=str(tmp_path / "none")))
    folder = tmp_path / "partitions" / "natural"
    folder.mkdir(parents=True)
    with pytest.raises(DataError, match="holds no partition"):
        training_sites(base_cell(data=str(tmp_path)))
    for site in ("A", "B"):
        (folder / f"{site}.json").write_text("{}")
    assert training_sites(base_cell(data=str(tmp_path))) == ["A", "B"]
    with pytest.raises(DataError, match="no datalist for site\\(s\\) C; available: A, B"):
        training_sites(base_cell(data=str(tmp_path), sites=["A", "C"]))


def test_round_records_end_with_the_final_models_validation(tmp_path):
    app = app_folder(tmp_path)
    (app / "best_model.json").write_text(json.dumps({"round": 1, "metric": 0.7, "final_model": {"round": 3, "metric": 0.85, "sites": {"A": 0.8, "B": 0.9}}}))
    assert round_records(app)["rounds"][-1] == {"round": 3, "mean_global_val_dice": pytest.approx(0.85), "sites": 2}
