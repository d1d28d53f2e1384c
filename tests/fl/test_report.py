"""`fedfms report` on the records a run wrote: the pre-stage, rounds and final tables."""

import json

import pytest

from fedfms.cli import main
from fedfms.errors import DataError
from fedfms.fl.report import IncompleteRun, report, server_app_dir

ROWS = [
    {"round": r, "site": s, "accepted": True, "bytes_received": 100, "global_val_dice": d, "local_val_dice": d}
    for r, d in ((0, 0.5), (1, 0.6)) for s in ("site-1", "site-2")
]
FM = {
    "mode": "fm",
    "proxy": {"datalist": "/data/partitions/age/server_proxy.json", "slices": 148, "foreground_slices": 90},
    "settings": {},
    "teacher": {"kind": "litemedsam", "cache_file": "/data/teacher_cache/teacher_x.pt", "cache_hit": True, "seconds": 0.4, "proxy_dice": 0.9015},
    "student": {"proxy_dice_before": 0.0946, "proxy_dice": 0.8203, "epoch_loss": [0.6971, 0.5489], "seconds": 65.1},
}


def _write(folder, **records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "round_metrics.json").write_text(json.dumps(ROWS))
    (folder / "final_test.json").write_text(json.dumps([{"site": "average", "dice_2d": 0.5, "iou_2d": 0.4, "dice_3d": 0.6}]))
    for name, record in records.items():
        (folder / f"{name}.json").write_text(json.dumps(record))


def test_report_shows_how_the_initial_model_was_made(tmp_path, capsys):
    _write(tmp_path, prestage=FM)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "initial global model: fm pre-stage on the server's proxy set (148 slices, /data/partitions/age/server_proxy.json)" in out
    assert "teacher litemedsam: proxy Dice 0.9015 on 90 slices with foreground (logits reused from its cache: /data/teacher_cache/teacher_x.pt)" in out
    assert "student: proxy Dice 0.0946 -> 0.8203 after 2 epochs (loss 0.6971 -> 0.5489, 65.1 s)" in out
    assert out.index("initial global model") < out.index("global model validation Dice")


def test_report_of_random_and_of_jobs_without_a_prestage(tmp_path, capsys):
    _write(tmp_path / "random", prestage={"mode": "random"})
    _write(tmp_path / "plain")
    assert main(["report", str(tmp_path / "random")]) == 0
    assert "initial global model: random (the network as built; no pre-stage)" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "plain")]) == 0
    assert "initial global model" not in capsys.readouterr().out


def test_report_of_a_run_without_final_scores_is_an_error(tmp_path, capsys):
    app = tmp_path / "app"
    app.mkdir()
    (app / "round_metrics.json").write_text(json.dumps([{"round": 0, "site": "site-1", "status": "failed", "reason": "x", "accepted": False, "bytes_received": 0, "global_val_dice": None}]))
    (app / "run_status.json").write_text(json.dumps({"status": "aborted", "reason": "Exception in workflow fedavg"}))
    with pytest.raises(IncompleteRun, match="no final test scores"):
        report(app)
    assert main(["report", str(app)]) == 4
    assert "run ABORTED: Exception in workflow fedavg" in capsys.readouterr().out


def test_report_finds_a_downloaded_job_result(tmp_path, capsys):
    """`nvflare job download` / the FLARE API put the server's records in <download>/<job id>/workspace/app_server."""
    _write(tmp_path / "download/5f1e-job/workspace/app_server")
    for given in (tmp_path / "download/5f1e-job", tmp_path / "download"):
        assert main(["report", str(given)]) == 0
        assert "global model validation Dice" in capsys.readouterr().out
    _write(tmp_path / "download/9a2c-job/workspace/app_server")
    with pytest.raises(DataError, match=r"holds the results of several jobs \(5f1e-job, 9a2c-job\); give the one to report"):
        server_app_dir(tmp_path / "download")
    with pytest.raises(DataError, match=r"no round_metrics.json here, in server/simulate_job/app_server \(simulator\)"):
        server_app_dir(tmp_path)


def test_report_tables_state_their_rules(tmp_path, capsys):
    """The validation title says MeanDice ignores empty-label slices; the final table names each column's rule."""
    _write(tmp_path)
    final = [
        {"site": "site-1", "dice_2d": 0.5, "iou_2d": 0.4, "dice_3d": 0.6, "dice_2d_fg": 0.7, "fp_rate_empty": None, "hd95_3d": 3.25, "note": None},
        {"site": "average", "dice_2d": 0.5, "iou_2d": 0.4, "dice_3d": 0.6, "note": "1 of 1 sites"},  # written before the new columns
    ]
    (tmp_path / "final_test.json").write_text(json.dumps(final))
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "global model validation Dice (scored at each site before local training; MONAI MeanDice over the validation slices with organ: empty-label slices are ignored)" in lines
    title = lines.index("final global model on each site's test split")
    assert lines[title + 1 : title + 8] == [
        "  dice_2d, iou_2d: all slices, empty-slice rule (empty label: 1 if nothing predicted, else 0); dice_3d: per volume, same rule",
        "  dice_2d_fg: slices with organ only; fp_empty: share of empty slices with predicted foreground",
        "  hd95: 95th-percentile Hausdorff distance per volume, pixels of the prepared label grid (not mm), volumes with an empty label or prediction left out",
        "  - : no value (e.g. fp_empty of a site without empty slices); average: over the sites with a value",
        "site                 dice_2d      iou_2d     dice_3d  dice_2d_fg    fp_empty        hd95",
        "site-1                0.5000      0.4000      0.6000      0.7000           -      3.2500",
        "average               0.5000      0.4000      0.6000           -           -           -  1 of 1 sites",
    ]


def test_report_names_the_sites_that_never_contributed(tmp_path, capsys):
    """A site that failed every round is listed plainly, with its own last message; a site that failed once is not."""
    failed = "site HK: no prepared data folder here (dataset_dir, set in /kit/local/fedfms_site.json)"
    rows = [*ROWS, *({"round": r, "site": "HK", "accepted": False, "status": "failed", "reason": failed, "bytes_received": 0,
                     "global_val_dice": None} for r in (0, 1))]
    rows[0] = {**rows[0], "accepted": False, "status": "timed_out", "reason": "no answer in 60 s"}  # site-1 once, accepted later
    _write(tmp_path)
    (tmp_path / "round_metrics.json").write_text(json.dumps(rows))
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("NEVER CONTRIBUTED: 1 site(s) had no update accepted in any round; the model was trained without them")
    assert lines[start + 1] == f"  HK: failed in round 1: {failed}"
    assert not any(line.startswith("  site-1:") for line in lines)


def test_report_shows_the_bytes_on_the_wire_against_the_tensor_bytes(tmp_path, capsys):
    """A compressed run shows as a share of the tensors' bytes (8-bit: about a quarter)."""
    rows = [{**row, "bytes_received": 4000, "wire_bytes_down": 1100 + row["round"], "wire_bytes_up": 1050} for row in ROWS]
    _write(tmp_path)
    (tmp_path / "round_metrics.json").write_text(json.dumps(rows))
    assert main(["report", str(tmp_path)]) == 0
    assert "site-1 1,101 / 1,050 (0.263), site-2 1,101 / 1,050 (0.263)" in capsys.readouterr().out


def _configs(folder, workflow: dict, learner: dict) -> None:
    (folder / "config").mkdir(parents=True)
    (folder / "config" / "config_fed_server.json").write_text(json.dumps({"workflows": [workflow]}))
    (folder / "config" / "config_fed_client.json").write_text(json.dumps({"components": [{"id": "learner", "args": {"bundle_root": "b", **learner}}]}))


@pytest.mark.parametrize("workflow, learner, line", [
    ({"path": "fedfms.fl.workflows.fedavg.ResumableFedAvg", "args": {}}, {}, "algorithm: fedavg"),
    ({"path": "fedfms.fl.workflows.fedavg.ResumableFedAvg", "args": {"fedprox_mu": 0.01, "patience": 3}}, {},
     "algorithm: fedprox (mu 0.01); early stopping after 3 rounds without a better mean validation Dice"),
    ({"path": "fedfms.fl.workflows.fedopt.ResumableFedOpt", "args": {"optimizer": "torch.optim.Adam", "optimizer_args": {"lr": 0.01, "betas": [0.9, 0.99]}}},
     {}, "algorithm: fedopt (server optimiser Adam lr 0.01, betas [0.9, 0.99])"),
    ({"path": "fedfms.fl.workflows.scaffold.ResumableScaffold", "args": {}}, {}, "algorithm: scaffold (control variates)"),
    ({"path": "fedfms.fl.workflows.fedavg.ResumableFedAvg", "args": {}}, {"ditto_lambda": 0.1, "norm_statistics": "local"},
     "algorithm: ditto (lambda 0.1: each site also trains a personal model) with FedBN (normalisation layers kept at the sites)"),
])
def test_report_names_the_algorithm_from_the_runs_own_configs(workflow, learner, line, tmp_path, capsys):
    _write(tmp_path)
    _configs(tmp_path, workflow, learner)
    assert main(["report", str(tmp_path)]) == 0
    assert line + "\n" in capsys.readouterr().out


def test_report_shows_the_personalised_scores_beside_the_global_ones(tmp_path, capsys):
    _write(tmp_path)
    rows = [{"site": "site-1", "dice_2d": 0.5}, {"site": "average", "dice_2d": 0.5},
            {"site": "personalised:site-1", "dice_2d": 0.7, "note": "Ditto's personal model"}, {"site": "personalised:average", "dice_2d": 0.7}]
    (tmp_path / "final_test.json").write_text(json.dumps(rows))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(personalised: each site's own model, Ditto's or FedBN's, on the same split)" in out
    assert "personalised:site-1      0.7000" in out and "Ditto's personal model" in out


@pytest.mark.parametrize("final, line", [
    ({"round": 2, "metric": 0.7}, "best global model: the one sent in round 2, mean validation Dice 0.7000; the final model (after 2 rounds) scored 0.7000, so it is the best"),
    ({"round": 2, "metric": 0.55}, "best global model: the one sent in round 1, mean validation Dice 0.6000; the final model (after 2 rounds) scored 0.5500"),
])
def test_report_says_which_model_is_the_best_one(final, line, tmp_path, capsys):
    best = {"round": 2, "metric": 0.7} if final["metric"] > 0.6 else {"round": 1, "metric": 0.6}
    _write(tmp_path, best_model={**best, "final_model": final})
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert line in out and (", so it is the best" in out) == (final["metric"] > 0.6)
