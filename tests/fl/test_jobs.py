"""Federated jobs through the real `nvflare simulator`, judged by the saved model and the logs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedfms.bundle import bundle_network
from fedfms.cli import main
from fedfms.models import count_parameters
from fedfms.data.partition import PartitionOptions, partition
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate
from fedfms.fl.learner import site_datalist

REPO = Path(__file__).resolve().parents[2]
NVFLARE = Path(sys.executable).with_name("nvflare")
SERVER_LOG_FAILURES = ("Unsuccessful callback", "FOBS protocol error", "Could not start", "failed to download")


@pytest.fixture(scope="module")
def fl_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fl_data")
    synthesize_prostate(root / "raw", sites=3, cases_per_site=3, seed=5, shape=(32, 32, 8))
    quiet = lambda _: None  # noqa: E731
    prepare(root / "raw", root / "data", PrepareOptions(image_size=64, label_size=64), log=quiet)
    prepare(root / "raw", root / "data_stack5", PrepareOptions(image_size=64, label_size=64, num_slices=5, all_label_slices=True), log=quiet)
    partition(root / "data", root / "data" / "partitions" / "natural", PartitionOptions(method="natural", proxy_fraction=0))
    return root


def _job_copy(job: str, tmp_path: Path, dataset_dir: Path, rounds: int) -> Path:
    """The job folder as shipped, pointed at the test's data and round count."""
    copy = tmp_path / job
    shutil.copytree(REPO / "jobs" / job, copy)
    server_file, client_file = copy / "app/config/config_fed_server.json", copy / "app/config/config_fed_client.json"
    server, client = json.loads(server_file.read_text()), json.loads(client_file.read_text())
    server["workflows"][0]["args"]["num_rounds"] = rounds
    client["components"][0]["args"]["dataset_dir"] = str(dataset_dir)
    server_file.write_text(json.dumps(server))
    client_file.write_text(json.dumps(client))
    return copy


def _simulate(job_dir: Path, workspace: Path, clients: int = 3) -> str:
    result = subprocess.run(
        [str(NVFLARE), "simulator", str(job_dir), "-w", str(workspace), "-n", str(clients), "-t", str(clients)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Finished FedAvg." in log, log[-3000:]
    for failure in SERVER_LOG_FAILURES:
        assert failure not in log, failure
    return log


def _trainable(network) -> set[str]:
    return {n for n, p in network.named_parameters() if p.requires_grad}


def test_fedmsa_job_exchanges_trainable_weights_weighted_by_samples(fl_data, tmp_path):
    log = _simulate(_job_copy("fedmsa_prostate", tmp_path, fl_data / "data", rounds=2), tmp_path / "ws")
    initial = bundle_network("bundles/fedmsa_prostate", ["train.json", "cpu_demo.json"])
    trainable = _trainable(initial)
    assert f"global model: {len(trainable)} trainable of {len(initial.state_dict())} tensors are exchanged" in log
    saved = torch.load(tmp_path / "ws/server/simulate_job/app_server/FL_global_model.pt", weights_only=False)
    changed = {k for k, v in initial.state_dict().items() if not torch.equal(torch.as_tensor(saved["model"][k]), v)}
    assert changed and changed <= trainable  # frozen weights never moved; trained ones did
    # FedAvg weights are the clients' training-sample counts.
    weights = {w["name"]: w["weight"] for w in saved["meta_props"]["metrics_aggregation_info"]["site_weights"]}
    folder = fl_data / "data" / "partitions" / "natural"
    for site, weight in weights.items():
        datalist = json.loads((folder / f"{site_datalist(site, folder)}.json").read_text())
        assert weight == len(datalist["training"])
    assert len(list((tmp_path / "ws/server/simulate_job/tb_events").glob("site-*/events.out.tfevents.*"))) == 3
    # Every contribution was recorded and accepted; each carried exactly the trainable bytes of `fedfms params`.
    app = tmp_path / "ws/server/simulate_job/app_server"
    rows = json.loads((app / "round_metrics.json").read_text())
    assert len(rows) == 2 * 3 and all(r["accepted"] for r in rows)
    assert {r["bytes_received"] for r in rows} == {count_parameters(initial).bytes_per_round}
    assert all(0 <= r["global_val_dice"] <= 1 for r in rows)
    final = {r["site"]: r for r in json.loads((app / "final_test.json").read_text())}
    assert set(final) == {"site-1", "site-2", "site-3", "average"}
    assert final["average"]["dice_2d"] == pytest.approx(sum(final[s]["dice_2d"] for s in ("site-1", "site-2", "site-3")) / 3)
    assert (app / "final_test.csv").read_text().startswith("site,dice_2d,iou_2d,dice_3d")
    assert (app / "best_FL_global_model.pt").is_file()  # IntimeModelSelector + persistor keep the best global model
    # The report reads those tables and draws the plot.
    assert main(["report", str(tmp_path / "ws")]) == 0
    assert (app / "dice_per_round.png").read_bytes()[:4] == b"\x89PNG"


def test_flapsam_job_aggregates_lora_by_svd(fl_data, tmp_path):
    log = _simulate(_job_copy("flapsam_prostate", tmp_path, fl_data / "data_stack5", rounds=1), tmp_path / "ws")
    assert "LoRA SVD aggregation of 3 clients over 18 layers: relative truncation error max" in log
    initial = bundle_network("bundles/flapsam_prostate", ["train.json", "cpu_demo.json"])
    saved = torch.load(tmp_path / "ws/server/simulate_job/app_server/FL_global_model.pt", weights_only=False)["model"]
    changed = {k for k, v in initial.state_dict().items() if not torch.equal(torch.as_tensor(saved[k]), v)}
    assert changed and changed <= _trainable(initial)


def test_site_names_map_onto_prepared_datalists(fl_data):
    folder = fl_data / "data" / "partitions" / "natural"
    assert site_datalist("site-1", folder) == "BMC" and site_datalist("site-3", folder) == "RUNMC"
    assert site_datalist("I2CVB", folder) == "I2CVB"
    with pytest.raises(ValueError, match="no datalist for site 'site-9'"):
        site_datalist("site-9", folder)


def test_report_without_a_run_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no round_metrics.json" in capsys.readouterr().err
