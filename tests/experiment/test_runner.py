"""The runner: progress, finished and failed cells, and a tiny experiment end to end with the real bundles and simulator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedfms.cli import main
from fedfms.experiment.runner import cell_state, duration, progress_line, run_cell_process
from tests.experiment.conftest import write_config


def test_progress_line_estimates_the_rest_from_the_mean_so_far():
    line = progress_line(3, 12, "fedmsa-federated", "ok", 52.4, 250.0, [40.0, 52.4, 60.0], 9)
    assert line == "[3/12] fedmsa-federated ok 52 s | elapsed 4 min 10 s | about 7 min 37 s left (9 cells x 51 s)"
    assert progress_line(1, 2, "a-local", "finished earlier, skipped", None, 0.2, [], 1) == (
        "[1/2] a-local finished earlier, skipped | elapsed 0 s | 1 cells left (estimate after the first run)")
    assert progress_line(2, 2, "a-local", "ok", 5, 9, [5], 0).endswith("| nothing left")
    assert duration(7322) == "2 h 02 min"


def test_cell_state(tmp_path):
    cell = {"id": "fedsam-local", "setting": "local", "seed": 0}
    assert cell_state(tmp_path, cell) == "pending"
    folder = tmp_path / "cells" / "fedsam-local"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"cell": cell, "status": "ok"}))
    assert cell_state(tmp_path, cell) == "done"
    assert cell_state(tmp_path, {**cell, "seed": 1}) == "changed"  # a changed file runs the cell again
    (folder / "result.json").write_text(json.dumps({"cell": cell, "status": "failed"}))
    assert cell_state(tmp_path, cell) == "failed"
    (folder / "result.json").write_text("{not json")
    assert cell_state(tmp_path, cell) == "pending"


def test_a_cell_process_that_dies_without_a_result_is_recorded_failed(tmp_path):
    cell = {"id": "broken-local"}  # no setting: the cell process fails before it can write a result
    (tmp_path / "cells" / "broken-local").mkdir(parents=True)
    (tmp_path / "cells" / "broken-local" / "stale.txt").write_text("from an earlier attempt")
    recorded = run_cell_process(cell, tmp_path, timeout=120)
    assert recorded["status"] == "failed" and recorded["reason"] == "the cell process exited with code 1 without writing result.json"
    assert "KeyError: 'setting'" in recorded["log_tail"] and recorded["log"] == "cells/broken-local/log.txt"
    folder = tmp_path / "cells" / "broken-local"
    assert json.loads((folder / "result.json").read_text()) == recorded
    assert not (folder / "stale.txt").exists()  # every attempt starts in a clean folder
    assert json.loads((folder / "cell.json").read_text()) == cell


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_tiny_experiment_end_to_end(tiny_data, tmp_path, capsys):
    """FLAP-SAM local, centralized and federated and MSA centralized, 1 round, on 64 px data; one cell made to fail (its data folder does not exist)."""
    missing = tmp_path / "no_such_data"
    config = write_config(tmp_path, f"""
name: tiny
data: {tiny_data / 'data'}
settings: [local, centralized, federated]
rounds: 1
epochs: 1
size: tiny
pretrained: false
threads: 2
qualitative_slices: 2
overrides: {{train#samples_per_epoch: 8}}
methods:
  - {{bundle: fedmsa_prostate, name: fedmsa_pt, settings: [centralized]}}
  - {{bundle: unet_prostate, name: broken, data: {missing}, settings: [local]}}
  - {{bundle: flapsam_prostate, name: flapsam_pt, data: {tiny_data / 'data_stack5'}}}
""")
    out = tmp_path / "out"
    assert main(["experiment", str(config), "--out", str(out)]) == 4  # a cell failed
    printed = capsys.readouterr().out
    ids = ["fedmsa_pt-centralized", "broken-local", "flapsam_pt-local", "flapsam_pt-centralized", "flapsam_pt-federated"]
    for index, cell in enumerate(ids, start=1):
        assert f"[{index}/5] {cell} " in printed and "| elapsed " in printed
    assert "[1/5] fedmsa_pt-centralized ok " in printed and " left (4 cells x " in printed
    results = {cell: json.loads((out / "cells" / cell / "result.json").read_text()) for cell in ids}

    # The failed cell is recorded with its reason and log; every other cell completed.
    broken = results.pop("broken-local")
    assert broken["status"] == "failed" and str(missing) in broken["reason"] and "no prepared data folder" in broken["reason"]
    assert "DataError" in broken["log_tail"] and (out / "cells/broken-local/log.txt").is_file()
    assert {cell: r["status"] for cell, r in results.items()} == {cell: "ok" for cell in results}
    sites = ["BMC", "RUNMC"]
    for cell, r in results.items():
        assert sorted(r["sites"]) == sites and all(_finite(r["sites"][s][m]) for s in sites for m in ("dice_2d", "iou_2d", "dice_3d"))
        assert 0 < r["parameters"]["trainable"] < r["parameters"]["total"] or r["cell"]["strategy"] == "full"
        for site in sites:
            with np.load(out / "cells" / cell / r["qualitative"][site]) as saved:
                assert saved["image"].shape == (2, 64, 64) and saved["prediction"].shape == saved["label"].shape == (2, 64, 64)
                assert saved["label"].sum() > 0
    federated = results["flapsam_pt-federated"]
    # Round 0 scores the initial model; round 1, the final one (validated by the final evaluation, after the only round).
    assert [p["round"] for p in federated["rounds"]] == [0, 1] and federated["contributions"] == {"accepted": 2}
    final = json.loads((out / "cells/flapsam_pt-federated/ws/server/simulate_job/app_server/best_model.json").read_text())["final_model"]
    assert federated["rounds"][1]["mean_global_val_dice"] == pytest.approx(np.mean(list(final["sites"].values())))
    assert federated["bytes_per_round"] > 0 and federated["run_status"]["status"] == "completed"
    assert (out / "cells/flapsam_pt-federated/ws/server/simulate_job/app_server/final_test.json").is_file()

    # Both table layouts, with finite numbers.
    tables = {t["name"]: t for t in json.loads((out / "report" / "tables.json").read_text())}
    fedfms = tables["fedfms_table1_dice_2d"]
    assert [(r["method"], r["cell"]) for r in fedfms["rows"]] == [("MSA-PT", "fedmsa_pt-centralized")]
    assert all(_finite(r[c]) for r in fedfms["rows"] for c in (*sites, "average"))
    assert fedfms["rules"][0].startswith("dice_2d: 2D Dice per test slice") and "empty-slice rule" in fedfms["rules"][0]
    [flap] = tables["flapsam_table1"]["rows"]
    assert flap["method"] == "FLAP-SAM-PT" and flap["bytes_per_round"] == federated["bytes_per_round"]
    assert 0 < flap["wire_bytes_up_per_round"] - flap["bytes_per_round"] < 65536  # measured on the wire: the tensors plus FOBS framing
    assert all(_finite(flap[c]) for c in ("local_dice_3d", "centralized_dice_3d", "federated_dice_3d", "trainable", "total", "bytes_per_round"))
    assert flap["local_dice_3d"] == pytest.approx(results["flapsam_pt-local"]["average"]["dice_3d"])
    for png in ("dice_per_round.png", "dice_vs_bytes.png", "qualitative_BMC.png", "qualitative_RUNMC.png"):
        assert (out / "report" / png).read_bytes()[:4] == b"\x89PNG", png

    # A re-run skips every finished cell and runs the failed one again.
    finished = {cell: r["finished"] for cell, r in results.items()}
    assert main(["experiment", str(config), "--out", str(out)]) == 4
    printed = capsys.readouterr().out
    assert all(f"{cell} finished earlier, skipped" in printed for cell in results)
    assert "broken-local: running (failed before: again)" in printed and "4 of 5 cells ok" in printed
    assert {cell: json.loads((out / "cells" / cell / "result.json").read_text())["finished"] for cell in results} == finished
