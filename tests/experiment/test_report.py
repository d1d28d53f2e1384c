"""The report of an experiment folder: tables and figures from the cells' results, through the API and the command line."""

from __future__ import annotations

import pytest

from fedfms.cli import main
from fedfms.errors import DataError
from fedfms.experiment.figures import dice_per_round, qualitative
from fedfms.experiment.report import is_experiment_dir, load_results, write_report
from tests.experiment.conftest import metrics, qualitative_npz, result, write_config, write_experiment_dir

PNG = b"\x89PNG"


def experiment(out):
    rounds = [{"round": n, "mean_global_val_dice": d, "sites": 2} for n, d in enumerate([0.2, 0.5])]
    sites = {"A": metrics(0.8), "B": metrics(0.6)}
    results = [
        result("fedmsa", "federated", sites, strategy="msa", rounds=rounds, bytes_per_round=2000.0, qualitative={"A": "qualitative/A.npz"}),
        result("flapsam", "federated", sites, model="flapsam", strategy="flap", rounds=rounds, bytes_per_round=500.0,
               qualitative={"A": "qualitative/A.npz", "B": "qualitative/B.npz"}),
        result("flapsam", "local", sites, model="flapsam", strategy="flap", qualitative={"A": "qualitative/A.npz"}),
    ]
    write_experiment_dir(out, results)
    qualitative_npz(out / "cells/fedmsa-federated/qualitative/A.npz", ["Case01", "Case02"])
    qualitative_npz(out / "cells/flapsam-federated/qualitative/A.npz", ["Case02", "Case01"], seed=1)  # same slices, other order
    qualitative_npz(out / "cells/flapsam-federated/qualitative/B.npz", ["Case07"])
    qualitative_npz(out / "cells/flapsam-local/qualitative/A.npz", ["Case09"])  # another slice: shown as not predicted
    return out


def test_report_writes_tables_and_figures(tmp_path):
    out = experiment(tmp_path / "exp")
    text, files = write_report(out)
    names = sorted(p.name for p in files)
    assert names == sorted(["tables.md", "tables.json", "fedfms_table1_dice_2d.csv", "fedfms_table1_iou_2d.csv", "flapsam_table1.csv", "rounds.csv",
                            "cells.csv", "dice_per_round.png", "dice_vs_bytes.png", "qualitative_A.png", "qualitative_B.png"])
    assert all(p.parent == out / "report" for p in files)
    assert all(p.read_bytes()[:4] == PNG for p in files if p.suffix == ".png")
    assert "3 cells, 3 ok, 0 failed, 0 pending" in text
    assert "| FedMSA | fedmsa-federated | 0.8000 | 0.6000 | 0.7000 |" in text
    assert "| FLAP-SAM | flap | fp32 | 0.7000 | - | 0.7000 | - | - | 500 | - |" in text


def test_pending_cells_are_listed(tmp_path):
    out = experiment(tmp_path / "exp")
    (out / "cells/flapsam-local/result.json").unlink()
    record, results = load_results(out)
    assert [r["status"] for r in results] == ["ok", "ok", "pending"] and record["name"] == "synthetic"
    assert "| flapsam-local | local | pending |" in write_report(out)[0]


def test_figures_need_something_to_draw(tmp_path):
    assert dice_per_round([result("fedsam", "local", {"A": metrics(0.5)})], tmp_path / "rounds.png") is None
    assert qualitative([result("fedsam", "local", {"A": metrics(0.5)})], tmp_path, "A", tmp_path / "q.png") is None
    assert not (tmp_path / "rounds.png").exists()


def test_not_an_experiment_folder(tmp_path):
    assert not is_experiment_dir(tmp_path)
    with pytest.raises(DataError, match="not an experiment folder \\(no experiment.json\\)"):
        write_report(tmp_path)


def test_command_line_report_of_an_experiment_folder(tmp_path, capsys):
    out = experiment(tmp_path / "exp")
    assert main(["report", str(out)]) == 0  # `fedfms report` recognises an experiment folder
    printed = capsys.readouterr().out
    assert "## FedFMS Table 1 layout: dice_2d" in printed and str(out / "report" / "qualitative_A.png") in printed
    config = write_config(tmp_path, "data: demo/data\nsettings: [federated]\nrounds: 1\nepochs: 1\nmethods:\n  - {bundle: fedmsa_prostate}\n")
    assert main(["experiment", str(config), "--out", str(out), "--report"]) == 0  # runs nothing: fedmsa-federated's result is kept
    assert (out / "report" / "tables.md").is_file()


def test_command_line_errors_name_the_file(tmp_path, capsys):
    config = write_config(tmp_path, "data: demo/data\nsettings: [federated]\nrounds: 0\nepochs: 1\nmethods:\n  - {bundle: fedmsa_prostate}\n")
    assert main(["experiment", str(config)]) == 2
    assert f"error: {config}: rounds: must be a whole number >= 1, got 0" in capsys.readouterr().err
    assert main(["experiment", str(tmp_path / "none.yaml"), "--list"]) == 2
    assert f"error: {tmp_path / 'none.yaml'}: no experiment file here" in capsys.readouterr().err
    good = write_config(tmp_path, "data: demo/data\nsettings: [local, federated]\nrounds: 1\nepochs: 1\nmethods:\n  - {bundle: unet_prostate}\n", "good.yaml")
    assert main(["experiment", str(good), "--out", str(tmp_path / "out"), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["unet-local", "pending", "unet-federated", "pending"]
    assert main(["experiment", str(good), "--out", str(tmp_path / "never_run"), "--report"]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
