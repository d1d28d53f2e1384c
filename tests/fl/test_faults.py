"""Faults injected into real simulator runs: every bad update refused whole, every failure recorded, no hang.

Two runs of the FedMSA job on three sites share the fault classes between them (one fault per
site and round): the first breaks updates (non-finite, frozen, unknown and missing keys, wrong
shapes arriving first and last, absurd and invalid sample counts) and ends with a round without
any acceptable update; the second has sites fail, hang and die.
"""

import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey

from fedfms.bundle import bundle_network
from fedfms.cli import main
from fedfms.fl.job_config import add_result_filters
from tests.fl.conftest import APP, NVFLARE, REPO, job_copy, simulate

pytestmark = pytest.mark.slow

FROZEN = "image_encoder.pos_embed"  # a weight the FedMSA strategy does not exchange
SITES = ("site-1", "site-2", "site-3")


LIVENESS = {"liveness_interval": 2, "liveness_timeout": 3}  # probes of silent sites, quicker than the jobs' 10 s
SERVER_CHECKS = {"server_check_interval": 2, "server_check_timeout": 3, "server_check_misses": 2}  # the sites' checks of the server


def drill_job(tmp_path: Path, data: Path, faults: list[dict], rounds: int, min_clients: int, timeout: int, wait: int = 60, **options) -> Path:
    """The shipped FedMSA job on a tiny SAM from random weights (a ViT with the frozen ``FROZEN``; many short
    rounds), with the drill learner and the outgoing-update recorder at every site."""
    job = job_copy(
        "fedmsa_prostate", tmp_path, data, rounds, min_clients=min_clients, task_timeout=timeout, wait_after_min_received=wait,
        size="tiny", pretrained=False, **options,
    )
    server_config = job / "app/config/config_fed_server.json"
    server = json.loads(server_config.read_text())
    for workflow in server["workflows"]:
        workflow["args"].update(LIVENESS)
    server_config.write_text(json.dumps(server, indent=2))
    config = job / "app/config/config_fed_client.json"
    client = json.loads(config.read_text())
    client["executors"][0]["executor"]["args"].update(SERVER_CHECKS)
    learner = client["components"][0]
    learner["path"] = "fedfms.fl.drills.FaultInjectingLearner"
    learner["args"]["faults"] = faults
    add_result_filters(client, [{"path": "fedfms.fl.drills.OutgoingUpdateRecorder", "args": {"folder": str(tmp_path / "sent")}}])
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
    {"site": "site-1", "round": 5, "kind": "scale", "factor": 1e6},  # finite, but far out of range
    {"site": "site-2", "round": 6, "kind": "boost", "factor": 100},  # a plausible update pulling 100 times as hard
    {"site": "site-1", "round": 7, "kind": "missing_keys"},
    {"site": "site-2", "round": 7, "kind": "wrong_shape", "delay": 4},  # arrives last
    {"site": "site-3", "round": 7, "kind": "weight", "value": 1000},  # more than it reported at first
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
    (5, "site-1"): "above the bound 10000 (max_abs_value)",
    (6, "site-2"): "of the other sites' changes this round, above the bound 10 (max_change_ratio)",
    (7, "site-1"): "exchanged keys missing",
    (7, "site-2"): "shape (",
    (7, "site-3"): "sample count 1000 is above the",
}


def run_drill(fl_data: Path, tmp_path_factory, name: str, faults: list[dict], **options) -> tuple[Path, str, Path]:
    """One drill in the simulator: its folder, the log, and the workspace."""
    tmp_path = tmp_path_factory.mktemp(name)
    job = drill_job(tmp_path, fl_data / "data", faults, **options)
    return tmp_path, simulate(job, tmp_path / "ws", expect_success=False), tmp_path / "ws"


@pytest.fixture(scope="module")
def bad_update_run(fl_data, tmp_path_factory):
    return run_drill(fl_data, tmp_path_factory, "bad_updates", BAD_UPDATES, rounds=10, min_clients=1, timeout=120)


def test_bad_updates_are_rejected_whole_with_their_reason(bad_update_run):
    tmp_path, log, workspace = bad_update_run
    rows = _rows(workspace)
    for (round_, site), reason in REASONS.items():
        row = rows[(round_, site)]
        assert row["status"] == "rejected" and not row["accepted"] and reason in row["reason"], row
        assert f"round {round_} {site}: accepted=False, status=rejected" in log
    accepted = {key for key, row in rows.items() if row["status"] == "accepted"}
    assert accepted == {(r, "site-3") for r in range(4)} | {(r, s) for r in (4, 5) for s in ("site-2", "site-3")} | {(6, "site-1"), (6, "site-3")}
    assert all(row["weight"] == row["num_train_samples"] > 0 and row["change_norm"] > 0 for key, row in rows.items() if key in accepted)
    assert "Traceback" not in log and "Unsuccessful callback" not in log


def test_finite_but_poisoned_updates_leave_the_global_model_the_mean_of_the_others(bad_update_run):
    tmp_path, _, workspace = bad_update_run
    rows = _rows(workspace)
    scaled = _sent(tmp_path, "site-1", 5)["data"]
    assert max(float(v.abs().max()) for v in scaled.values() if v.is_floating_point()) > 1e5  # it was sent, and refused
    boosted, honest = rows[(6, "site-2")], [rows[(6, s)]["change_norm"] for s in ("site-1", "site-3")]
    assert float(boosted["reason"].split("change norm ")[1].split()[0]) > 10 * sorted(honest)[0]
    _assert_weighted_mean(tmp_path, workspace, 6, ["site-1", "site-3"])  # the global model the run ends with


def test_a_round_without_acceptable_updates_ends_the_run_on_the_last_good_model(bad_update_run, fl_data):
    tmp_path, log, workspace = bad_update_run
    status = json.loads((workspace / APP / "run_status.json").read_text())
    assert status["status"] == "ended_early" and status["rounds_completed"] == 7
    assert "round 7: 0 acceptable updates of 3 sites, fewer than min_clients 1" in status["reason"]
    assert "Round 8 started." not in log
    saved = torch.load(workspace / APP / "FL_global_model.pt", weights_only=False)
    assert saved["meta_props"]["completed_rounds"] == 7  # the global model of round 6, untouched by round 7
    _assert_weighted_mean(tmp_path, workspace, 6, ["site-1", "site-3"])
    initial = bundle_network("bundles/fedmsa_prostate", ["train.json", "cpu_demo.json"], size="tiny", pretrained_checkpoint="scratch")
    assert torch.equal(torch.as_tensor(saved["model"][FROZEN]), initial.state_dict()[FROZEN])  # never overwritten
    final = {r["site"]: r for r in json.loads((workspace / APP / "final_test.json").read_text())}
    assert all(0 <= final[s]["dice_2d"] <= 1 for s in SITES)  # every site scored the last good global model


def test_report_shows_the_refused_updates_and_the_early_end(bad_update_run, capsys):
    _, _, workspace = bad_update_run
    assert main(["report", str(workspace)]) == 0
    out = capsys.readouterr().out
    assert "run ENDED EARLY: round 7: 0 acceptable updates" in out
    assert "contributions: 24 expected: 10 accepted, 14 rejected, 0 failed, 0 timed out, 0 lost, 0 late" in out
    assert f"round 1 site-1: rejected: key {FROZEN} is frozen" in out


FAILURES = [
    {"site": "site-2", "round": 1, "kind": "exception"},
    {"site": "site-3", "round": 2, "kind": "hang", "seconds": 15},  # silent: the others answer, it gets 5 s more
    {"site": "site-1", "round": 3, "kind": "die"},  # lost: never sampled again, skipped by the final evaluation
    {"site": "site-2", "task": "validate", "round": 0, "kind": "hang", "seconds": 900},  # hangs in the final evaluation
]
TASK_TIMEOUT, WAIT = 300, 5


@pytest.fixture(scope="module")
def failure_run(fl_data, tmp_path_factory):
    started = time.monotonic()
    run = run_drill(fl_data, tmp_path_factory, "failures", FAILURES, rounds=6, min_clients=1, timeout=TASK_TIMEOUT, wait=WAIT)
    return (*run, time.monotonic() - started)


def _round_seconds(log: str) -> dict[str, float]:
    """Seconds from each "Round N started." (and "Finished FedAvg.") of the server log to the next such line."""
    marks = re.findall(r"^(\S+ \S+) - .*\n[-=]+\n\s+(Round \d+ started\.|Finished FedAvg\.)", log, re.M)
    times = [(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f"), name) for stamp, name in marks]
    return {name: (later - earlier).total_seconds() for (earlier, name), (later, _) in zip(times, times[1:])}


def test_failed_silent_and_dead_sites_cost_seconds_and_are_recorded(failure_run):
    tmp_path, log, workspace, wall = failure_run
    rows = _rows(workspace)
    failed = rows[(1, "site-2")]
    assert failed["status"] == "failed" and "EXECUTION_EXCEPTION: " in failed["reason"]
    assert "injected fault: train failed at site-2 in round 1" in failed["reason"]  # the site's own message
    assert rows[(2, "site-3")]["status"] == "timed_out" and f"no answer within {WAIT} s after" in rows[(2, "site-3")]["reason"]
    lost = rows[(3, "site-1")]
    assert lost["status"] == "lost" and "lost connection: its job process did not answer" in lost["reason"]
    assert (4, "site-1") not in rows and (5, "site-1") not in rows and "round 4 trains on ['site-2', 'site-3']; lost: ['site-1']" in log
    assert rows[(5, "site-3")]["status"] == "accepted"  # back after hanging (when depends on the machine's speed)
    # Only the hung site answered late or not at all (round 0 aside: its wait includes the sites' start-up).
    assert all(site == "site-3" for (round_, site), row in rows.items() if row["status"] in ("late", "timed_out") and round_ > 0)
    status = json.loads((workspace / APP / "run_status.json").read_text())
    assert status["status"] == "completed" and "Finished FedAvg." in log
    _assert_weighted_mean(tmp_path, workspace, 5, ["site-2", "site-3"])
    final = {r["site"]: r for r in json.loads((workspace / APP / "final_test.json").read_text())}
    assert "no scores: lost in round 3: lost connection" in final["site-1"]["note"]
    assert final["site-2"].get("dice_2d") is None and "did not answer" in final["site-2"]["note"]  # hung in the evaluation
    assert 0 <= final["site-3"]["dice_2d"] <= 1 and final["average"]["note"] == "1 of 3 sites"
    # What the faults cost: the dead site's round and every later one took far less than the task timeout,
    # and the whole run (with a site asleep for 900 s in the final evaluation) ended on its own.
    seconds = _round_seconds(log)
    assert all(seconds[f"Round {r} started."] < TASK_TIMEOUT / 5 for r in (3, 4, 5)), seconds
    assert wall < TASK_TIMEOUT, wall
    assert "ending this site's job process" in log


def _start_simulator(job: Path, workspace: Path) -> subprocess.Popen:
    command = [str(NVFLARE), "simulator", str(job), "-w", str(workspace), "-n", "3", "-t", "3"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for_row(workspace: Path, key: tuple[int, str], process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if (workspace / APP / "round_metrics.json").is_file() and key in _rows(workspace):
            return
        time.sleep(0.5)
    raise AssertionError(f"no row {key} within {seconds} s (simulator exit code {process.poll()})")


def test_a_server_killed_mid_round_resumes_with_one_row_per_contribution_and_its_bounds(fl_data, tmp_path):
    interrupted = [{"site": "site-1", "round": 2, "kind": "nan"}, {"site": "site-3", "round": 2, "kind": "hang", "seconds": 120}]
    first = drill_job(tmp_path / "first", fl_data / "data", interrupted, rounds=4, min_clients=3, timeout=TASK_TIMEOUT, wait=WAIT)
    process = _start_simulator(first, tmp_path / "ws1")
    try:
        _wait_for_row(tmp_path / "ws1", (2, "site-1"), process, seconds=240)  # round 2 is under way, a row of it written
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the whole simulator: server and sites
        process.wait()
    saved = tmp_path / "ws1" / APP
    assert torch.load(saved / "FL_global_model.pt", weights_only=False)["meta_props"]["completed_rounds"] == 2
    inflated = [{"site": "site-2", "round": 3, "kind": "weight", "value": 100000}]  # after the restart
    second = drill_job(tmp_path / "second", fl_data / "data", inflated, rounds=4, min_clients=1, timeout=TASK_TIMEOUT, wait=30, resume_from=str(saved))
    log = simulate(second, tmp_path / "ws2", expect_success=False)
    assert f"resuming from {saved / 'FL_global_model.pt'}, saved after 2 completed rounds" in log
    assert "resuming at round 2: 2 of 4 rounds left" in log and "Round 1 started." not in log
    best = json.loads((saved / "best_model.json").read_text())  # the best model so far, and its score, continue
    assert f"best global model so far: round {best['round']}, val_mean_dice {best['metric']:.4f}" in log
    assert (tmp_path / "ws2" / APP / "best_FL_global_model.pt").is_file()
    rows = json.loads((tmp_path / "ws2" / APP / "round_metrics.json").read_text())
    assert sorted((r["round"], r["site"]) for r in rows) == [(r, s) for r in range(4) for s in SITES]  # once each
    assert rows[-1]["round"] == 3 and _rows(tmp_path / "ws2")[(2, "site-1")]["status"] == "accepted"  # round 2's new rows
    refused, first = _rows(tmp_path / "ws2")[(3, "site-2")], _rows(tmp_path / "ws2")[(0, "site-2")]["weight"]
    assert refused["status"] == "rejected" and f"sample count 100000 is above the {first:g} the site reported in its first update" in refused["reason"]
    assert json.loads((tmp_path / "ws2" / APP / "run_status.json").read_text())["status"] == "completed"
