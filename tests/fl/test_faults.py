"""Faults injected into real simulator runs: every bad update refused whole, every failure recorded, no hang.

Two runs of the FedMSA job on three sites share the fault classes between them (one fault per
site and round): the first breaks updates (non-finite, frozen, unknown and missing keys, wrong
shapes arriving first and last, absurd and invalid sample counts) and ends with a round without
any acceptable update; the second has sites fail, hang and die.
"""

import json
from pathlib import Path

import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey

from fedfms.bundle import bundle_network
from fedfms.cli import main
from tests.fl.conftest import APP, job_copy, simulate

pytestmark = pytest.mark.slow

FROZEN = "image_encoder.pos_embed"  # a weight the FedMSA strategy does not exchange
SITES = ("site-1", "site-2", "site-3")


def drill_job(tmp_path: Path, data: Path, faults: list[dict], rounds: int, min_clients: int, timeout: int) -> Path:
    """The shipped FedMSA job on a tiny SAM from random weights (a ViT with the frozen ``FROZEN``; many short
    rounds), with the drill learner and the outgoing-update recorder at every site."""
    job = job_copy("fedmsa_prostate", tmp_path, data, rounds, min_clients=min_clients, task_timeout=timeout, size="tiny", pretrained=False)
    config = job / "app/config/config_fed_client.json"
    client = json.loads(config.read_text())
    learner = client["components"][0]
    learner["path"] = "fedfms.fl.drills.FaultInjectingLearner"
    learner["args"]["faults"] = faults
    client["task_result_filters"] = [
        {"tasks": ["train"], "filters": [{"path": "fedfms.fl.drills.OutgoingUpdateRecorder", "args": {"folder": str(tmp_path / "sent")}}]}
    ]
    config.write_text(json.dumps(client, indent=2))
    return job


def _rows(workspace: Path) -> dict[tuple[int, str], dict]:
    return {(r["round"], r["site"]): r for r in json.loads((workspace / APP / "round_metrics.json").read_text())}


def _sent(tmp_path: Path, site: str, round_: int) -> dict:
    return torch.load(tmp_path / "sent" / f"{site}_round{round_}.pt", weights_only=False)


def _assert_weighted_mean(tmp_path: Path, workspace: Path, round_: int, sites: list[str]) -> None:
    """The saved global model's exchanged tensors are the sample-weighted mean of the accepted updates."""
    updates = [_sent(tmp_path, s, round_) for s in sites]
    weights = [u["meta"][FLMetaKey.NUM_STEPS_CURRENT_ROUND] for u in updates]
    saved = torch.load(workspace / APP / "FL_global_model.pt", weights_only=False)["model"]
    for key in updates[0]["data"]:
        expected = sum(w * u["data"][key].double() for w, u in zip(weights, updates)) / sum(weights)
        torch.testing.assert_close(torch.as_tensor(saved[key]).double(), expected, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in saved.values() if torch.as_tensor(v).is_floating_point())


BAD_UPDATES = [
    {"site": "site-1", "round": 0, "kind": "nan"},
    {"site": "site-2", "round": 0, "kind": "wrong_shape"},  # arrives first: the good site-3 answers 3 s later
    {"site": "site-3", "round": 0, "kind": "delay", "seconds": 3},
    {"site": "site-1", "round": 1, "kind": "frozen_key", "key": FROZEN},
    {"site": "site-2", "round": 1, "kind": "unknown_key"},
    {"site": "site-1", "round": 2, "kind": "weight", "value": 1e12},
    {"site": "site-2", "round": 2, "kind": "weight", "value": 0},
    {"site": "site-1", "round": 3, "kind": "weight", "value": -5},
    {"site": "site-2", "round": 3, "kind": "weight", "value": "nan"},
    {"site": "site-1", "round": 4, "kind": "nan_inf"},  # round 4: site-2 and site-3 are averaged
    {"site": "site-1", "round": 5, "kind": "missing_keys"},
    {"site": "site-2", "round": 5, "kind": "wrong_shape", "delay": 4},  # arrives last
    {"site": "site-3", "round": 5, "kind": "weight", "value": 1000},  # more than it reported at first
]
REASONS = {
    (0, "site-1"): "non-finite values (NaN or Inf)",
    (0, "site-2"): "shape (",
    (1, "site-1"): f"key {FROZEN} is frozen",
    (1, "site-2"): "unknown key not_in_the_model.weight",
    (2, "site-1"): "sample count 1e+12 is above the bound",
    (2, "site-2"): "sample count 0.0 is not a finite positive number",
    (3, "site-1"): "sample count -5.0 is not a finite positive number",
    (3, "site-2"): "sample count nan is not a finite positive number",
    (4, "site-1"): "non-finite values (NaN or Inf)",
    (5, "site-1"): "exchanged keys missing",
    (5, "site-2"): "shape (",
    (5, "site-3"): "sample count 1000 is above the",
}


def run_drill(fl_data: Path, tmp_path_factory, name: str, faults: list[dict], **options) -> tuple[Path, str, Path]:
    """One drill in the simulator: its folder, the log, and the workspace."""
    tmp_path = tmp_path_factory.mktemp(name)
    job = drill_job(tmp_path, fl_data / "data", faults, **options)
    return tmp_path, simulate(job, tmp_path / "ws", expect_success=False), tmp_path / "ws"


@pytest.fixture(scope="module")
def bad_update_run(fl_data, tmp_path_factory):
    return run_drill(fl_data, tmp_path_factory, "bad_updates", BAD_UPDATES, rounds=8, min_clients=1, timeout=120)


def test_bad_updates_are_rejected_whole_with_their_reason(bad_update_run):
    tmp_path, log, workspace = bad_update_run
    rows = _rows(workspace)
    for (round_, site), reason in REASONS.items():
        row = rows[(round_, site)]
        assert row["status"] == "rejected" and not row["accepted"] and reason in row["reason"], row
        assert f"round {round_} {site}: accepted=False, status=rejected" in log
    accepted = {key for key, row in rows.items() if row["status"] == "accepted"}
    assert accepted == {(r, "site-3") for r in range(4)} | {(4, "site-2"), (4, "site-3")}
    assert "Traceback" not in log and "Unsuccessful callback" not in log


def test_a_round_without_acceptable_updates_ends_the_run_on_the_last_good_model(bad_update_run, fl_data):
    tmp_path, log, workspace = bad_update_run
    status = json.loads((workspace / APP / "run_status.json").read_text())
    assert status["status"] == "ended_early" and status["rounds_completed"] == 5
    assert "round 5: 0 acceptable updates of 3 sites, fewer than min_clients 1" in status["reason"]
    assert "Round 6 started." not in log
    saved = torch.load(workspace / APP / "FL_global_model.pt", weights_only=False)
    assert saved["meta_props"]["completed_rounds"] == 5  # the global model of round 4, untouched by round 5
    _assert_weighted_mean(tmp_path, workspace, 4, ["site-2", "site-3"])
    initial = bundle_network("bundles/fedmsa_prostate", ["train.json", "cpu_demo.json"], size="tiny", pretrained_checkpoint="scratch")
    assert torch.equal(torch.as_tensor(saved["model"][FROZEN]), initial.state_dict()[FROZEN])  # never overwritten
    final = {r["site"]: r for r in json.loads((workspace / APP / "final_test.json").read_text())}
    assert all(0 <= final[s]["dice_2d"] <= 1 for s in SITES)  # every site scored the last good global model


def test_report_shows_the_refused_updates_and_the_early_end(bad_update_run, capsys):
    _, _, workspace = bad_update_run
    assert main(["report", str(workspace)]) == 0
    out = capsys.readouterr().out
    assert "run ENDED EARLY: round 5: 0 acceptable updates" in out
    assert "contributions: 18 expected: 6 accepted, 12 rejected, 0 failed, 0 timed out, 0 late" in out
    assert f"round 1 site-1: rejected: key {FROZEN} is frozen" in out


FAILURES = [
    {"site": "site-2", "round": 1, "kind": "exception"},
    {"site": "site-3", "round": 2, "kind": "hang", "seconds": 35},  # longer than the 25 s task timeout
    {"site": "site-1", "round": 3, "kind": "die"},
]


@pytest.fixture(scope="module")
def failure_run(fl_data, tmp_path_factory):
    # 25 s: round 0's task time includes the sites' start-up (three processes importing torch on two cores).
    return run_drill(fl_data, tmp_path_factory, "failures", FAILURES, rounds=4, min_clients=2, timeout=25)


def test_failed_silent_and_dead_sites_do_not_stop_the_run(failure_run):
    tmp_path, log, workspace = failure_run
    rows = _rows(workspace)
    assert rows[(1, "site-2")]["status"] == "failed" and "EXECUTION_EXCEPTION" in rows[(1, "site-2")]["reason"]
    assert rows[(2, "site-3")]["status"] == "timed_out"
    assert rows[(3, "site-1")]["status"] == "timed_out"  # dead from round 3 on (the final evaluation below too)
    assert rows[(3, "site-3")]["status"] == "accepted"  # back after hanging: joined the next round
    # NVFlare's client asks whether its task still stands before sending, so the hung answer is dropped there.
    assert {r for r, row in rows.items() if row["status"] == "late"} <= {(2, "site-3")}
    status = json.loads((workspace / APP / "run_status.json").read_text())
    assert status["status"] == "completed" and "Finished FedAvg." in log
    _assert_weighted_mean(tmp_path, workspace, 3, ["site-2", "site-3"])
    final = {r["site"]: r for r in json.loads((workspace / APP / "final_test.json").read_text())}
    assert final["site-1"].get("dice_2d") is None and "did not answer" in final["site-1"]["note"]
    assert all(0 <= final[s]["dice_2d"] <= 1 for s in ("site-2", "site-3")) and final["average"]["note"] == "2 of 3 sites"
