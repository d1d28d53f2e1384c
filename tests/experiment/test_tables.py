"""The papers' table layouts from synthetic results: rows, columns and exact numbers."""

from __future__ import annotations

import json

import pytest

from fedfms.experiment.tables import (
    build_tables, cells_table, csv_text, fedfms_table, flapsam_table, markdown, rounds_table, rounds_to, write_tables,
)
from tests.experiment.conftest import metrics, result

SITES = {"A": metrics(0.8, 0.9), "B": metrics(0.6, 0.5)}


def fedfms_results() -> list[dict]:
    return [
        result("fedunet", "federated", {"A": metrics(0.5), "B": metrics(0.3)}, model="unet"),
        result("fedmsa_pt", "centralized", {"A": metrics(0.4), "B": metrics(0.2)}, strategy="msa", pretrained=False),
        result("fedsam", "federated", SITES),
        result("fedsam", "local", SITES),  # FedFMS Table 1 has no local row
        result("fedmsa", "federated", {"A": metrics(0.7), "C": metrics(0.9)}, strategy="msa"),
        result("fednnunet", "federated", SITES, model="dynunet", status="failed"),  # failed cells have no row
    ]


def test_fedfms_table_rows_in_the_papers_order_with_sites_and_average():
    table = fedfms_table(fedfms_results(), "dice_2d")
    assert table.columns == ["method", "cell", "A", "B", "C", "average"]
    assert [(r["method"], r["cell"]) for r in table.rows] == [
        ("FedSAM", "fedsam-federated"), ("FedMSA", "fedmsa-federated"), ("MSA-PT", "fedmsa_pt-centralized"), ("FedU-Net", "fedunet-federated")]
    assert csv_text(table) == (
        "method,cell,A,B,C,average\n"
        "FedSAM,fedsam-federated,0.8,0.6,,0.7\n"
        "FedMSA,fedmsa-federated,0.7,,0.9,0.8\n"
        "MSA-PT,fedmsa_pt-centralized,0.4,0.2,,0.30000000000000004\n"
        "FedU-Net,fedunet-federated,0.5,0.3,,0.4\n"
    )
    text = markdown(table)
    assert "| FedSAM | fedsam-federated | 0.8000 | 0.6000 | - | 0.7000 |" in text
    assert "empty-slice rule: a slice (volume) whose label is empty scores 1 if nothing is predicted there, else 0" in text
    iou = fedfms_table(fedfms_results(), "iou_2d")
    assert iou.rows[0]["A"] == pytest.approx(0.4) and "iou_2d: 2D IoU per test slice" in markdown(iou)


def test_rows_two_methods_share_are_told_apart():
    results = [result("fedsam", "federated", SITES), result("fedsam_b", "federated", SITES)]
    assert [r["method"] for r in fedfms_table(results).rows] == ["FedSAM (fedsam-federated)", "FedSAM (fedsam_b-federated)"]


def flapsam_results() -> list[dict]:
    full = {"parameters": {"trainable": 9000, "total": 10000}}
    flap = {"parameters": {"trainable": 1000, "total": 10500}}
    return [
        result("flapsam", "federated", SITES, model="flapsam", strategy="flap", bytes_per_round=1000.0, wire_bytes_up_per_round=1100.0, **flap),
        result("flapsam", "local", {"A": metrics(0.2, 0.3), "B": metrics(0.2, 0.5)}, model="flapsam", strategy="flap", **flap),
        result("flapsam_full", "local", SITES, model="flapsam", **full),
        result("flapsam_full", "centralized", {"A": metrics(0.5, 0.6)}, model="flapsam", **full),
        result("flapsam_full", "federated", SITES, model="flapsam", bytes_per_round=4000.0, **full),
        result("flapsam_pdec_pt", "local", SITES, model="flapsam", strategy="pdec", pretrained=False, parameters={"trainable": 10, "total": 20}),
        result("fedsam", "federated", SITES),  # not a FLAP-SAM row
    ]


def test_flapsam_table_settings_parameters_and_bytes():
    table = flapsam_table(flapsam_results())
    assert table.columns == ["method", "strategy", "exchange", "local_dice_3d", "centralized_dice_3d", "federated_dice_3d", "trainable", "total",
                             "bytes_per_round", "wire_bytes_up_per_round", "times_fewer_bytes_than_fullft"]
    assert csv_text(table) == (
        "method,strategy,exchange,local_dice_3d,centralized_dice_3d,federated_dice_3d,trainable,total,bytes_per_round,wire_bytes_up_per_round,"
        "times_fewer_bytes_than_fullft\n"
        "FullFT,full,fp32,0.7,0.6,0.7,9000,10000,4000.0,,1.0\n"
        "PDecFT-PT,pdec,fp32,0.7,,,10,20,,,\n"
        "FLAP-SAM,flap,fp32,0.4,,0.7,1000,10500,1000.0,1100.0,4.0\n"
    )
    text = markdown(table)
    assert "| FLAP-SAM | flap | fp32 | 0.4000 | - | 0.7000 | 1,000 | 10,500 | 1,000 | 1,100 | 4.0x |" in text
    assert "dice_3d: 3D Dice per test volume" in text and "bytes per round: mean tensor bytes of one site's accepted update" in text and "wire bytes up: the same update as NVFlare serialised it" in text


def test_compressed_rows_are_compared_with_fp32_fullft_on_the_wire():
    """The ratio uses the bytes measured on the wire where both rows have them: compression shows there, not in the count."""
    full = {"parameters": {"trainable": 9000, "total": 10000}}
    results = [
        result("flapsam_full", "federated", SITES, model="flapsam", bytes_per_round=4000.0, wire_bytes_up_per_round=4400.0, **full),
        result("flapsam_full_nf4", "federated", SITES, model="flapsam", bytes_per_round=4000.0, wire_bytes_up_per_round=700.0, **full),
        result("flapsam_nf4", "federated", SITES, model="flapsam", strategy="flap", bytes_per_round=1000.0, wire_bytes_up_per_round=220.0),
    ]
    results[1]["cell"]["compress"] = results[2]["cell"]["compress"] = "nf4"
    rows = {r["method"]: r for r in flapsam_table(results).rows}
    assert rows["FullFT"]["times_fewer_bytes_than_fullft"] == 1.0 and rows["FullFT nf4"]["exchange"] == "nf4"
    assert rows["FullFT nf4"]["times_fewer_bytes_than_fullft"] == pytest.approx(4400 / 700)
    assert rows["FLAP-SAM nf4"]["times_fewer_bytes_than_fullft"] == 20.0


def test_flapsam_table_without_fullft_has_no_ratio():
    rows = flapsam_table([r for r in flapsam_results() if r["cell"]["method"] != "flapsam_full"]).rows
    assert [r["times_fewer_bytes_than_fullft"] for r in rows] == [None, None]


def test_rounds_table_and_rounds_to_target():
    rounds = [{"round": n, "mean_global_val_dice": d, "sites": 2} for n, d in enumerate([0.1, 0.65, 0.72, 0.9])]
    fast = [{"round": n, "mean_global_val_dice": d, "sites": 2} for n, d in enumerate([0.8, 0.6])]
    results = [
        result("random_age", "federated", SITES, model="smlite", rounds=rounds),
        result("fm_age", "federated", SITES, model="smlite", rounds=fast, prestage={"mode": "fm", "student_proxy_dice": 0.82}),
        result("fedsam", "local", SITES),
    ]
    table = rounds_table(results, target=0.7)
    assert table.columns == ["cell", "r0", "r1", "r2", "r3", "test_dice_2d", "test_dice_3d", "proxy_dice", "rounds_to_target"]
    assert [(r["cell"], r["rounds_to_target"], r["proxy_dice"]) for r in table.rows] == [("random_age-federated", 2, None), ("fm_age-federated", 0, 0.82)]
    assert table.rows[1]["r2"] is None and table.rows[0]["test_dice_3d"] == pytest.approx(0.7)
    assert rounds_to([0.1, 0.2], 0.7) is None
    assert "| random_age-federated | 0.1000 | 0.6500 | 0.7200 | 0.9000 | 0.7000 | 0.7000 | - | 2 |" in markdown(table)
    no_target = rounds_table([result("random_age", "federated", SITES, model="smlite", rounds=rounds[:2])], target=0.7)
    assert "| >1 |" in markdown(no_target)


def test_cells_table_lists_failed_and_pending_cells():
    results = [
        result("fedsam", "federated", SITES, bytes_per_round=5.0, parameters={"trainable": 3, "total": 4}),
        {**result("broken", "local", {}, status="failed"), "reason": "DataError: /x: no prepared data folder here\nmore"},
        {"cell": {"id": "later-federated", "setting": "federated"}, "status": "pending"},
        result("fedmsa", "loso", SITES, strategy="msa", unseen={"C": metrics(0.3, 0.25)}),
    ]
    rows = cells_table(results).rows
    assert [(r["cell"], r["status"]) for r in rows] == [("fedsam-federated", "ok"), ("broken-local", "failed"), ("later-federated", "pending"), ("fedmsa-loso", "ok")]
    assert rows[0]["dice_3d"] == pytest.approx(0.7) and rows[0]["bytes_per_round"] == 5.0 and rows[0]["trainable"] == 3
    assert rows[1]["reason"] == "DataError: /x: no prepared data folder here" and rows[1]["dice_2d"] is None
    assert rows[3]["unseen_dice_3d"] == 0.25


def test_write_tables_markdown_csv_json(tmp_path):
    tables = build_tables(fedfms_results() + flapsam_results(), 0.7)
    files = write_tables(tables, tmp_path / "report", "# header\n\n")
    assert sorted(p.name for p in files) == sorted(["tables.md", "fedfms_table1_dice_2d.csv", "fedfms_table1_iou_2d.csv", "flapsam_table1.csv", "rounds.csv", "cells.csv", "tables.json"])
    saved = {t["name"]: t for t in json.loads((tmp_path / "report" / "tables.json").read_text())}
    assert saved["flapsam_table1"]["rows"][2]["times_fewer_bytes_than_fullft"] == 4.0
    assert saved["fedfms_table1_dice_2d"]["rules"][0].startswith("dice_2d: 2D Dice per test slice")
    text = (tmp_path / "report" / "tables.md").read_text()
    assert text.startswith("# header") and "## FLAP-SAM Table 1 layout" in text and "(no cells for this table)" not in text
    assert "(no cells for this table)" in markdown(flapsam_table(fedfms_results()))  # rows only for the methods present
