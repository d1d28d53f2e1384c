"""FedProx, FedOpt, SCAFFOLD, Ditto and early stopping through the real `nvflare simulator`, judged by the saved models and records."""

import json
from pathlib import Path

import pytest
import torch

from fedfms.cli import main
from fedfms.fl.site_settings import SETTINGS_ENV
from tests.fl.conftest import APP, job_copy, same_model, simulate

pytestmark = pytest.mark.slow

TINY = {"size": "tiny", "pretrained": False}  # FedMSA's job on a tiny SAM: adapters and decoder train and travel
SITES = ["site-1", "site-2"]


def _run(fl_data: Path, folder: Path, rounds: int, site_state: Path | None = None, **options) -> Path:
    """Run fedmsa_prostate on two sites; ``site_state``: the sites' output folder (kept across runs, as a hospital's is)."""
    job = job_copy("fedmsa_prostate", folder, fl_data / "data", rounds, **{**TINY, **options})
    env = None
    if site_state:
        for site in SITES:
            (folder / f"{site}.json").write_text(json.dumps({"output_dir": str(site_state / site)}))
        env = {SETTINGS_ENV: str(folder / "{site}.json")}
    simulate(job, folder / "ws", clients=len(SITES), env=env)
    return folder / "ws" / APP


def _rows(app: Path) -> list[dict]:
    return json.loads((app / "round_metrics.json").read_text())


def _all_accepted(app: Path, rounds: list[int]) -> bool:
    rows = _rows(app)
    return sorted((r["round"], r["site"]) for r in rows) == [(n, s) for n in rounds for s in SITES] and all(r["status"] == "accepted" for r in rows)


def _saved(app: Path) -> dict:
    return torch.load(app / "FL_global_model.pt", weights_only=False)


def _close_models(first: Path, second: Path, atol: float) -> None:
    a, b = _saved(first)["model"], _saved(second)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(torch.as_tensor(b[key]), torch.as_tensor(a[key]), rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def fedavg_run(fl_data, tmp_path_factory) -> Path:
    return _run(fl_data, tmp_path_factory.mktemp("fedavg"), rounds=2)


def test_fedprox_with_mu_zero_computes_fedavgs_model(fedavg_run, fl_data, tmp_path):
    app = _run(fl_data, tmp_path, rounds=2, algorithm="fedprox", fedprox_mu=0.0)
    assert _all_accepted(app, [0, 1]) and _all_accepted(fedavg_run, [0, 1])
    assert same_model(app / "FL_global_model.pt", fedavg_run / "FL_global_model.pt")


def test_fedopt_with_sgd_lr_1_and_no_momentum_computes_fedavgs_model(fedavg_run, fl_data, tmp_path):
    app = _run(fl_data, tmp_path, rounds=2, algorithm="fedopt", server_optimizer="sgd", server_lr=1.0, server_momentum=0.0)
    assert _all_accepted(app, [0, 1])
    # The sites send changes here, weights there: float rounding (1e-7) that round 1's training grows to about 2e-6,
    # far below what one round changes (1e-4 and more).
    _close_models(fedavg_run, app, atol=1e-5)


def test_fedprox_pulls_each_sites_change_toward_the_global_model(fedavg_run, fl_data, tmp_path):
    app = _run(fl_data, tmp_path, rounds=1, algorithm="fedprox", fedprox_mu=100.0)
    assert _all_accepted(app, [0])
    plain = {r["site"]: r["change_norm"] for r in _rows(fedavg_run) if r["round"] == 0}
    proximal = {r["site"]: r["change_norm"] for r in _rows(app)}
    assert all(0 < proximal[site] < plain[site] for site in SITES), (proximal, plain)


@pytest.mark.parametrize("options", [
    {"algorithm": "scaffold"},
    {"algorithm": "fedopt", "server_optimizer": "adam", "server_lr": 0.01, "server_momentum": 0.9},
], ids=["scaffold", "fedadam"])
def test_a_resumed_run_continues_from_the_saved_algorithm_state(options, fl_data, tmp_path):
    """Round 1 run after a restart (server state from the saved model, sites' state from their output folders) == run straight through."""
    straight = _run(fl_data, tmp_path / "straight", rounds=2, site_state=tmp_path / "straight_sites", **options)
    first = _run(fl_data, tmp_path / "first", rounds=1, site_state=tmp_path / "sites", **options)
    resumed = _run(fl_data, tmp_path / "resumed", rounds=2, site_state=tmp_path / "sites", resume_from=str(first), **options)
    assert _all_accepted(straight, [0, 1]) and _all_accepted(resumed, [0, 1])
    state = _saved(straight)["meta_props"]
    if options["algorithm"] == "scaffold":
        controls = state["scaffold_global_controls"]
        assert controls and all(torch.isfinite(c).all() for c in controls.values()) and any(c.abs().sum() > 0 for c in controls.values())
        assert all(len(list((tmp_path / "sites" / site).glob("fedfms_site_state/*/scaffold_local_controls.pt"))) == 1 for site in SITES)
        assert _saved(resumed)["meta_props"]["fedfms_run_id"] == _saved(first)["meta_props"]["fedfms_run_id"]  # the sites' state is found again
    else:
        assert state["server_optimizer_state"]["state"]  # Adam's moments, saved with the model
    # Without the saved state the second round differs: the comparison below can tell.
    _close_models(straight, resumed, atol=1e-6)


def test_ditto_scores_the_global_and_each_sites_personal_model(fl_data, tmp_path):
    app = _run(fl_data, tmp_path, rounds=1, site_state=tmp_path / "sites", algorithm="ditto", ditto_lambda=0.1)
    assert _all_accepted(app, [0])
    final = {r["site"]: r for r in json.loads((app / "final_test.json").read_text())}
    assert {"site-1", "site-2", "average", "personalised:site-1", "personalised:site-2", "personalised:average"} == set(final)
    assert all(final[f"personalised:{s}"]["note"] == "Ditto's personal model" and final[f"personalised:{s}"]["dice_2d"] is not None for s in SITES)
    saved = _saved(app)["model"]
    for site in SITES:  # the personal model trained on past the global one the site received, and stayed at the site
        personal = torch.load(next((tmp_path / "sites" / site).glob("fedfms_site_state/*/ditto_personal_model.pt")))
        assert any(not torch.equal(v, torch.as_tensor(saved[k])) for k, v in personal.items())
    assert main(["report", str(tmp_path / "ws")]) == 0


def test_patience_ends_the_rounds_and_keeps_the_best_model(fl_data, tmp_path, capsys):
    """With learning rate 0 the global model never changes, so its validation Dice never improves after round 0."""
    app = _run(fl_data, tmp_path, rounds=5, patience=1, overrides={"learning_rate": 0.0})
    status = json.loads((app / "run_status.json").read_text())
    assert status["status"] == "stopped_early" and status["rounds_completed"] == 2 and status["rounds_planned"] == 5
    assert "has not improved on" in status["reason"] and "(the model sent in round 0) for 1 rounds (patience)" in status["reason"]
    assert _all_accepted(app, [0, 1]) and (app / "best_FL_global_model.pt").is_file() and (app / "final_test.json").is_file()
    assert main(["report", str(tmp_path / "ws")]) == 0
    assert "run stopped early: the mean validation Dice" in capsys.readouterr().out
