"""Methods x settings -> cells with stable ids and everything their process needs."""

from __future__ import annotations

import json

import pytest

from fedfms.experiment.cells import cell_dir, expand_cells, select_cells
from fedfms.experiment.config import load_config
from tests.experiment.conftest import write_config

CONFIG = """
data: demo/data
partition: partitions/natural
loso_partition: partitions/loso
sites: [BIDMC, BMC]
settings: [local, centralized, federated]
rounds: 3
epochs: 2
seed: 7
size: tiny
threads: 2
methods:
  - {bundle: fedmsa_prostate, settings: [federated, loso, local]}
  - {bundle: fedmsa_prostate, pretrained: false}
  - {bundle: flapsam_prostate, strategy: pdec, data: demo/data_stack5, partition: datalists}
  - {bundle: unet_prostate, settings: [federated]}
"""


@pytest.fixture
def cells(tmp_path) -> list[dict]:
    return expand_cells(load_config(write_config(tmp_path, CONFIG)))


def test_cell_ids_follow_the_file_order(cells):
    assert [c["id"] for c in cells] == [
        "fedmsa-federated", "fedmsa-loso", "fedmsa-local",
        "fedmsa_pt-local", "fedmsa_pt-centralized", "fedmsa_pt-federated",
        "flapsam_pdec-local", "flapsam_pdec-centralized", "flapsam_pdec-federated",
        "unet-federated",
    ]


def test_cells_carry_what_their_setting_needs(cells):
    by_id = {c["id"]: c for c in cells}
    federated, loso, local = by_id["fedmsa-federated"], by_id["fedmsa-loso"], by_id["fedmsa-local"]
    assert federated["job"].endswith("jobs/fedmsa_prostate") and federated["rounds"] == 3 and federated["epochs"] == 2
    assert federated["threads"] == 2 and federated["train_epochs"] is None and federated["partition"] == "partitions/natural"
    assert loso["partition"] == "partitions/loso" and loso["job"] == federated["job"]
    assert local["job"] is None and local["rounds"] is None and local["train_epochs"] == 6  # rounds x epochs
    assert {c["seed"] for c in cells} == {7} and all(c["config_files"] == ["train.json", "cpu_demo.json"] for c in cells)
    pt, pdec, unet = by_id["fedmsa_pt-federated"], by_id["flapsam_pdec-local"], by_id["unet-federated"]
    assert (pt["model"], pt["strategy"], pt["pretrained"], pt["size"]) == ("sam", "msa", False, "tiny")
    assert (pdec["model"], pdec["strategy"], pdec["partition"]) == ("flapsam", "pdec", "datalists") and pdec["data"].endswith("demo/data_stack5")
    assert (unet["model"], unet["size"], unet["pretrained"]) == ("unet", None, True)
    assert all(c["sites"] == ["BIDMC", "BMC"] for c in cells)


def test_the_same_file_gives_the_same_cells(tmp_path, cells):
    again = expand_cells(load_config(write_config(tmp_path, CONFIG, "again.yaml")))
    assert again == cells  # a re-run recognises its finished cells
    assert json.loads(json.dumps(cells)) == cells  # what the cell process reads back is what was written


def test_select_cells_by_pattern(cells):
    assert [c["id"] for c in select_cells(cells, ["fedmsa-*", "*-centralized"])] == [
        "fedmsa-federated", "fedmsa-loso", "fedmsa-local", "fedmsa_pt-centralized", "flapsam_pdec-centralized"]
    assert select_cells(cells, None) == cells
    with pytest.raises(ValueError, match="--only 'nothing-\\*' matches no cell; cells: fedmsa-federated"):
        select_cells(cells, ["nothing-*"])


def test_cell_dir(tmp_path, cells):
    assert cell_dir(tmp_path, cells[0]) == tmp_path / "cells" / "fedmsa-federated"
