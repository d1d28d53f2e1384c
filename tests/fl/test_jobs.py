"""Every federated job through the real `nvflare simulator`, judged by the saved model and the logs."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedfms.bundle import bundle_network
from fedfms.cli import main
from fedfms.data.partition import PartitionOptions, partition
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate
from fedfms.fl.learner import site_datalist
from fedfms.models import count_parameters
from tests.fl.conftest import APP, job_copy, simulate

pytestmark = pytest.mark.slow  # every test here runs the real simulator or prepares its data

SITES = ("BMC", "I2CVB", "RUNMC")  # the three synthetic sites, in sorted order (site-1..3)


@pytest.fixture(scope="module")
def fl_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fl_data")
    synthesize_prostate(root / "raw", sites=3, cases_per_site=3, seed=5, shape=(32, 32, 8))
    quiet = lambda _: None  # noqa: E731
    prepare(root / "raw", root / "data", PrepareOptions(image_size=64, label_size=64), log=quiet)
    prepare(root / "raw", root / "data_stack5", PrepareOptions(image_size=64, label_size=64, num_slices=5, all_label_slices=True), log=quiet)
    partition(root / "data", root / "data" / "partitions" / "natural", PartitionOptions(method="natural", proxy_fraction=0))
    partition(root / "data", root / "data" / "partitions" / "loso", PartitionOptions(method="loso", unseen_site="RUNMC", proxy_fraction=0))
    return root


@dataclass
class Run:
    job: str
    workspace: Path
    log: str
    data: Path
    datalist_dir: str
    bundle: str

    @property
    def app(self) -> Path:
        return self.workspace / APP


def _run(job: str, fl_data: Path, tmp_path: Path, rounds: int, clients: int | tuple[str, ...] = 3, data: str = "data", resume_from: str | None = None) -> Run:
    job_dir = job_copy(job, tmp_path, fl_data / data, rounds, resume_from=resume_from)
    log = simulate(job_dir, tmp_path / "ws", clients)
    client = json.loads((job_dir / "app/config/config_fed_client.json").read_text())["components"][0]["args"]
    return Run(job, tmp_path / "ws", log, fl_data / data, client["datalist_dir"], client["bundle_root"])


def _trainable(network) -> set[str]:
    return {n for n, p in network.named_parameters() if p.requires_grad}


def _check_federated_run(run: Run, rounds: list[int], sites: list[str]) -> torch.nn.Module:
    """What every job must show: trainable-only change, accepted sample-weighted updates of the right size, test tables."""
    initial = bundle_network(run.bundle, ["train.json", "cpu_demo.json"])
    trainable = _trainable(initial)
    assert f"global model: {len(trainable)} trainable of {len(initial.state_dict())} tensors are exchanged" in run.log
    saved = torch.load(run.app / "FL_global_model.pt", weights_only=False)
    changed = {k for k, v in initial.state_dict().items() if not torch.equal(torch.as_tensor(saved["model"][k]), v)}
    assert changed and changed <= trainable  # frozen weights never moved; trained ones did
    assert saved["meta_props"]["completed_rounds"] == rounds[-1] + 1
    folder = run.data / run.datalist_dir
    samples = {site: len(json.loads((folder / f"{site_datalist(site, folder)}.json").read_text())["training"]) for site in sites}
    aggregation = saved["meta_props"].get("metrics_aggregation_info", {})
    if "site_weights" in aggregation:  # recorded by FedAvg's own aggregation (the LoRA-SVD aggregator has its own test)
        assert {w["name"]: w["weight"] for w in aggregation["site_weights"]} == samples
    # Every contribution was recorded and accepted, weighted by its samples, and carried exactly the trainable bytes.
    rows = json.loads((run.app / "round_metrics.json").read_text())
    assert sorted((r["round"], r["site"]) for r in rows) == sorted((n, s) for n in rounds for s in sites)
    assert all(r["accepted"] and r["num_train_samples"] == samples[r["site"]] for r in rows)
    assert {r["bytes_received"] for r in rows} == {count_parameters(initial).bytes_per_round}
    assert all(0 <= r["global_val_dice"] <= 1 for r in rows)
    assert all(f"round {n} {site}: accepted=True, {count_parameters(initial).bytes_per_round:,} bytes" in run.log for n in rounds for site in sites)
    final = {r["site"]: r for r in json.loads((run.app / "final_test.json").read_text())}
    assert set(sites) | {"average"} <= set(final)
    assert final["average"]["dice_2d"] == pytest.approx(sum(final[s]["dice_2d"] for s in sites) / len(sites))
    return initial


@pytest.fixture(scope="module")
def fedmsa_run(fl_data, tmp_path_factory) -> Run:
    return _run("fedmsa_prostate", fl_data, tmp_path_factory.mktemp("fedmsa"), rounds=2)


def test_fedmsa_job_exchanges_trainable_weights_weighted_by_samples(fedmsa_run, tmp_path):
    _check_federated_run(fedmsa_run, rounds=[0, 1], sites=["site-1", "site-2", "site-3"])
    app = fedmsa_run.app
    for site in ("site-1", "site-2", "site-3"):  # streamed to the server's TensorBoard through NVFlare's tracking API
        events = EventAccumulator(str(fedmsa_run.workspace / "server/simulate_job/tb_events" / site))
        events.Reload()
        assert {"train_loss", "global_val_dice", "local_val_dice"} <= set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("train_loss")] == [0, 1]
    assert (app / "final_test.csv").read_text().startswith("site,dice_2d,iou_2d,dice_3d")
    assert (app / "best_FL_global_model.pt").is_file()  # IntimeModelSelector + persistor keep the best global model
    # The report reads those tables and draws the plot.
    assert main(["report", str(fedmsa_run.workspace)]) == 0
    assert (app / "dice_per_round.png").read_bytes()[:4] == b"\x89PNG"


def test_restarted_server_resumes_from_the_last_global_model(fedmsa_run, tmp_path):
    """A second run given the first one's global model continues at round 2 of 3 instead of starting over."""
    saved = tmp_path / "last_global_model.pt"
    shutil.copy(fedmsa_run.app / "FL_global_model.pt", saved)
    resumed = _run("fedmsa_prostate", fedmsa_run.data.parent, tmp_path, rounds=3, resume_from=str(saved))
    assert f"resuming from {saved}, saved after 2 completed rounds" in resumed.log
    assert "resuming at round 2: 1 of 3 rounds left" in resumed.log
    assert "Round 2 started." in resumed.log and "Round 0 started." not in resumed.log and "Round 1 started." not in resumed.log
    _check_federated_run(resumed, rounds=[2], sites=["site-1", "site-2", "site-3"])
    before, after = torch.load(saved, weights_only=False)["model"], torch.load(resumed.app / "FL_global_model.pt", weights_only=False)["model"]
    assert any(not torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k])) for k in before)


def test_flapsam_job_aggregates_lora_by_svd(fl_data, tmp_path):
    run = _run("flapsam_prostate", fl_data, tmp_path, rounds=1, data="data_stack5")
    assert "LoRA SVD aggregation of 3 clients over 18 layers: relative truncation error max" in run.log
    _check_federated_run(run, rounds=[0], sites=["site-1", "site-2", "site-3"])


def test_fedsam_job_runs_with_real_site_names(fl_data, tmp_path):
    run = _run("fedsam_prostate", fl_data, tmp_path, rounds=1, clients=SITES)
    initial = _check_federated_run(run, rounds=[0], sites=list(SITES))
    assert _trainable(initial) == set(initial.state_dict()) - {k for k, _ in initial.named_buffers()}  # full fine-tuning


@pytest.mark.parametrize("job, clients", [("fedunet_prostate", ("BMC", "RUNMC")), ("fednnunet_prostate", 2)])
def test_unet_baseline_jobs(job, clients, fl_data, tmp_path):
    sites = list(clients) if isinstance(clients, tuple) else ["site-1", "site-2"]
    _check_federated_run(_run(job, fl_data, tmp_path, rounds=1, clients=clients), rounds=[0], sites=sites)


def test_leave_one_site_out_job_tests_the_unseen_site(fl_data, tmp_path):
    run = _run("fedmsa_prostate_loso", fl_data, tmp_path, rounds=1, clients=("BMC", "I2CVB"))
    _check_federated_run(run, rounds=[0], sites=["BMC", "I2CVB"])
    assert {r["data"] for r in json.loads((run.app / "round_metrics.json").read_text())} == {"BMC", "I2CVB"}  # RUNMC never trains
    final = {r["site"]: r for r in json.loads((run.app / "final_test.json").read_text())}
    assert all(0 <= final["unseen:RUNMC"][k] <= 1 for k in ("dice_2d", "iou_2d", "dice_3d"))
    unseen_cases = {s["case"] for s in json.loads((run.data / "partitions/loso/unseen.json").read_text())["testing"]}
    evaluated = (run.app / "eval_unseen/per_volume.csv").read_text().splitlines()[1:]
    assert len(evaluated) == len(unseen_cases) and all(row.startswith("RUNMC,") for row in evaluated)


def test_job_without_data_stops_and_says_where_it_looked(tmp_path):
    job_dir = job_copy("fedmsa_prostate", tmp_path, tmp_path / "no_data", rounds=1)
    log = simulate(job_dir, tmp_path / "ws", 2, expect_success=False)
    assert f"{tmp_path / 'no_data' / 'partitions' / 'natural'}: no such partition folder; make the demo data with `make demo`" in log
    assert "Finished FedAvg." not in log and not (tmp_path / "ws" / APP / "FL_global_model.pt").exists()


def test_site_names_map_onto_prepared_datalists(fl_data):
    folder = fl_data / "data" / "partitions" / "natural"
    assert site_datalist("site-1", folder) == "BMC" and site_datalist("site-3", folder) == "RUNMC"
    assert site_datalist("I2CVB", folder) == "I2CVB"
    with pytest.raises(ValueError, match="no datalist for site 'site-9'"):
        site_datalist("site-9", folder)


def test_report_without_a_run_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no round_metrics.json" in capsys.readouterr().err
