"""Every federated job through the real `nvflare simulator`, judged by the saved model and the logs."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nvflare.apis.fl_constant import FLMetaKey

from fedfms.bundle import evaluate_checkpoint
from fedfms.cli import main
from fedfms.errors import DataError
from fedfms.fl.executors.learner import site_datalist
from fedfms.fl.job_config import add_result_filters
from fedfms.fl.site_settings import SETTINGS_ENV
from tests.fl.conftest import APP, check_federated_run, exchanged, job_copy, same_model, simulate

pytestmark = pytest.mark.slow  # every test here runs the real simulator or prepares its data

SITES = ("BMC", "I2CVB", "RUNMC")  # the three synthetic sites, in sorted order (site-1..3)


@dataclass
class Run:
    job: str
    workspace: Path
    log: str
    data: Path
    datalist_dir: str
    bundle: str
    sent: Path  # every update as it left its site
    network: dict = field(default_factory=dict)  # the bundle overrides of the job's network options

    @property
    def app(self) -> Path:
        return self.workspace / APP


def _run(job: str, fl_data: Path, tmp_path: Path, rounds: int, clients: int | tuple[str, ...] = 3, data: str = "data",
         site_settings: dict[str, dict] | None = None, threads: int | None = None, **options) -> Run:
    job_dir = job_copy(job, tmp_path, fl_data / data, rounds, **options)
    _record_outgoing(job_dir, tmp_path / "sent")
    env = _site_settings(job_dir, fl_data / data, tmp_path / "settings", site_settings) if site_settings else None
    log = simulate(job_dir, tmp_path / "ws", clients, env=env, threads=threads)
    client = json.loads((job_dir / "app/config/config_fed_client.json").read_text())["components"][0]["args"]
    network = {k: options[k] for k in ("size", "image_size", "strategy") if k in options}
    if options.get("pretrained") is False:
        network["pretrained_checkpoint"] = "scratch"
    return Run(job, tmp_path / "ws", log, fl_data / data, client["datalist_dir"], client["bundle_root"], tmp_path / "sent", network)


def _site_settings(job_dir: Path, data: Path, folder: Path, settings: dict[str, dict]) -> dict:
    """Each site's own settings file, named through the environment; the job's data path then leads nowhere."""
    config = job_dir / "app/config/config_fed_client.json"
    config.write_text(config.read_text().replace(str(data), "/no/such/data"))
    folder.mkdir()
    for site, values in settings.items():
        (folder / f"{site}.json").write_text(json.dumps(values))
    return {SETTINGS_ENV: str(folder / "{site}.json")}


def _record_outgoing(job_dir: Path, folder: Path) -> None:
    """Every site saves each update as it leaves (fedfms.fl.drills.OutgoingUpdateRecorder), for the checks below."""
    config = job_dir / "app/config/config_fed_client.json"
    client = json.loads(config.read_text())
    recorder = {"path": "fedfms.fl.drills.OutgoingUpdateRecorder", "args": {"folder": str(folder)}}
    add_result_filters(client, [recorder])  # joins the train chain (NVFlare takes one per task), before the wire-size filter
    config.write_text(json.dumps(client))


def _trainable(network) -> set[str]:
    return {n for n, p in network.named_parameters() if p.requires_grad}


def _weighted_mean_of_sent(run: Run, round_: int, sites: list[str], key: str) -> torch.Tensor:
    updates = [torch.load(run.sent / f"{site}_round{round_}.pt", weights_only=False) for site in sites]
    weights = [u["meta"][FLMetaKey.NUM_STEPS_CURRENT_ROUND] for u in updates]
    return sum(w * u["data"][key].double() for w, u in zip(weights, updates)) / sum(weights)


def _mean_global_val_dice(app: Path) -> dict[int, float]:
    """Per round from round 1, the mean validation Dice the sites gave the model they received, as the job's model selector takes it."""
    rows = [r for r in json.loads((app / "round_metrics.json").read_text()) if r["accepted"] and r["global_val_dice"] is not None]
    return {n: float(np.mean([r["global_val_dice"] for r in rows if r["round"] == n])) for n in {r["round"] for r in rows if r["round"] > 0}}


TINY = {"size": "tiny", "pretrained": False}  # the same job on a tiny SAM: the pretrained LiteMedSAM path runs in the fedsam test


@pytest.fixture(scope="module")
def fedmsa_run(fl_data, tmp_path_factory) -> Run:
    return _run("fedmsa_prostate", fl_data, tmp_path_factory.mktemp("fedmsa"), rounds=2, **TINY)


def test_fedmsa_job_exchanges_trainable_weights_weighted_by_samples(fedmsa_run, tmp_path):
    check_federated_run(fedmsa_run, rounds=[0, 1], sites=["site-1", "site-2", "site-3"])
    app = fedmsa_run.app
    for site in ("site-1", "site-2", "site-3"):  # streamed to the server's TensorBoard through NVFlare's tracking API
        events = EventAccumulator(str(fedmsa_run.workspace / "server/simulate_job/tb_events" / site))
        events.Reload()
        assert {"train_loss", "global_val_dice", "local_val_dice"} <= set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("train_loss")] == [0, 1]
    assert (app / "final_test.csv").read_text().startswith("site,dice_2d,iou_2d,dice_3d")
    assert (app / "best_FL_global_model.pt").is_file()  # IntimeModelSelector + persistor keep the best global model
    # No round scores the final model: the final evaluation does, and it is the best model when it beats the rounds' best.
    best = json.loads((app / "best_model.json").read_text())
    assert best["final_model"]["round"] == 2 and "validation Dice of the final global model: site-1 " in fedmsa_run.log
    final_is_best = best["final_model"]["metric"] > max(_mean_global_val_dice(app).values())  # round 0's model is the initial one
    assert (best["round"] == 2) == final_is_best == same_model(app / "best_FL_global_model.pt", app / "FL_global_model.pt")
    # The report reads those tables and draws the plot.
    assert main(["report", str(fedmsa_run.workspace)]) == 0
    assert (app / "dice_per_round.png").read_bytes()[:4] == b"\x89PNG"


def test_fedmsa_job_on_one_client_process_computes_the_same_model(fedmsa_run, fl_data, tmp_path):
    """`-t 1`, the simulator's default: every task of every site runs in a process of its own, and from round 1 the
    global model arrives as torch tensors. Every contribution is accepted and the model is bit for bit the one of `-t 3`."""
    run = _run("fedmsa_prostate", fl_data, tmp_path, rounds=2, threads=1, **TINY)
    assert run.log.count("ClientTaskWorker started to run") >= 9  # 2 rounds + the final test, 3 sites: a process per task
    check_federated_run(run, rounds=[0, 1], sites=["site-1", "site-2", "site-3"])
    assert same_model(run.app / "FL_global_model.pt", fedmsa_run.app / "FL_global_model.pt")


def test_flapsam_job_aggregates_lora_by_svd(fl_data, tmp_path):
    """On a tiny SAM from random weights (its 18 LoRA layers; LiteMedSAM's are tested in tests/models)."""
    run = _run("flapsam_prostate", fl_data, tmp_path, rounds=1, data="data_stack5", size="tiny", pretrained=False)
    assert "LoRA SVD aggregation of 3 clients over 18 layers: relative truncation error max" in run.log
    check_federated_run(run, rounds=[0], sites=["site-1", "site-2", "site-3"])


def test_fedsam_job_runs_with_real_site_names_each_on_its_own_settings(fl_data, tmp_path):
    """Each hospital's own settings file points it at its data and output folder; the job's data path is never used."""
    settings = {site: {"dataset_dir": str(fl_data / "data"), "num_threads": 1, "device": "cpu", "output_dir": str(tmp_path / "out" / site)} for site in SITES}
    run = _run("fedsam_prostate", fl_data, tmp_path, rounds=1, clients=SITES, site_settings=settings)
    initial = check_federated_run(run, rounds=[0], sites=list(SITES))
    for site in SITES:
        assert f"site settings of {site}: dataset_dir={fl_data / 'data'}, num_threads=1, device=cpu" in run.log
        assert (tmp_path / "out" / site / "simulate_job/eval/per_volume.csv").is_file()  # outputs where the site said
        assert not (run.workspace / site / "simulate_job" / f"app_{site}" / "eval").exists()
    assert _trainable(initial) == set(initial.state_dict()) - {k for k, _ in initial.named_buffers()}  # full fine-tuning


def test_fedunet_global_model_carries_the_sites_batch_norm_statistics(fl_data, tmp_path):
    """FedU-Net: running statistics are averaged like the weights, and the final test scores the saved model itself."""
    sites = ["BMC", "RUNMC"]
    run = _run("fedunet_prostate", fl_data, tmp_path, rounds=1, clients=tuple(sites))
    initial = check_federated_run(run, rounds=[0], sites=sites)
    saved = torch.load(run.app / "FL_global_model.pt", weights_only=False)["model"]
    statistics = [k for k in initial.state_dict() if k.endswith(("running_mean", "running_var"))]
    assert statistics and set(statistics) <= exchanged(initial)
    for key in statistics:
        torch.testing.assert_close(torch.as_tensor(saved[key]).double(), _weighted_mean_of_sent(run, 0, sites, key), rtol=1e-5, atol=1e-7)
    # final_test is the saved global model as it is: the same scores from the file itself
    final = {r["site"]: r for r in json.loads((run.app / "final_test.json").read_text())}
    scores = evaluate_checkpoint(run.bundle, ["train.json", "cpu_demo.json"], run.app / "FL_global_model.pt", tmp_path / "eval",
                                 dataset_dir=str(run.data), datalist_dir=run.datalist_dir, sites="BMC")
    assert scores["dice_2d"] == pytest.approx(final["BMC"]["dice_2d"], abs=1e-6) and final["BMC"]["note"] is None


def test_fednnunet_with_local_normalisation_layers_fedbn(fl_data, tmp_path):
    run = _run("fednnunet_prostate", fl_data, tmp_path, rounds=1, clients=2, norm_statistics="local")
    initial = check_federated_run(run, rounds=[0], sites=["site-1", "site-2"], norm_statistics="local")
    norm_keys = {k for k in initial.state_dict() if ".norm" in k}
    assert norm_keys and not norm_keys & exchanged(initial, "local")  # instance-norm layers stay at the sites
    final = {r["site"]: r for r in json.loads((run.app / "final_test.json").read_text())}
    assert all("FedBN" in final[s]["note"] for s in ("site-1", "site-2"))
    # The site rows score the global model as saved (its normalisation layers as they started) ...
    scores = evaluate_checkpoint(run.bundle, ["train.json", "cpu_demo.json"], run.app / "FL_global_model.pt", tmp_path / "eval",
                                 dataset_dir=str(run.data), datalist_dir=run.datalist_dir, sites=site_datalist("site-1", run.data / run.datalist_dir))
    assert scores["dice_2d"] == pytest.approx(final["site-1"]["dice_2d"], abs=1e-6)
    # ... and the personalised rows the same weights with each site's own layers, kept at the site under the run's id.
    assert all(final[f"personalised:{s}"]["note"] == "the global weights with the site's own normalisation layers (FedBN)" for s in ("site-1", "site-2"))
    assert final["personalised:average"]["note"] == "2 of 2 sites"
    assert len(list(run.workspace.glob("site-*/fedfms_site_state/*/fedbn_local_layers.pt"))) == 2


def test_leave_one_site_out_unseen_site_only_evaluates(fl_data, tmp_path):
    """RUNMC is a participant that never trains or sends weights and scores the final model on its own data."""
    run = _run("fedmsa_prostate_loso", fl_data, tmp_path, rounds=1, clients=("BMC", "I2CVB", "RUNMC"))
    check_federated_run(run, rounds=[0], sites=["BMC", "I2CVB"])
    server = run.app / "config/config_fed_server.json"
    assert "dataset_dir" not in server.read_text()  # the server never reads a site's data
    assert {r["data"] for r in json.loads((run.app / "round_metrics.json").read_text())} == {"BMC", "I2CVB"}
    assert sorted(p.name for p in run.sent.iterdir()) == ["BMC_round0.pt", "I2CVB_round0.pt"]  # RUNMC sent nothing
    assert "site RUNMC is the unseen site" in run.log and "refuses" not in run.log
    final = {r["site"]: r for r in json.loads((run.app / "final_test.json").read_text())}
    assert all(0 <= final["unseen:RUNMC"][k] <= 1 for k in ("dice_2d", "iou_2d", "dice_3d"))
    assert "RUNMC" not in final and final["average"]["note"] == "2 of 2 sites"
    unseen_cases = {s["case"] for s in json.loads((run.data / "partitions/loso/unseen.json").read_text())["testing"]}
    evaluated = (run.workspace / "RUNMC/simulate_job/app_RUNMC/eval/per_volume.csv").read_text().splitlines()[1:]
    assert len(evaluated) == len(unseen_cases) and all(row.startswith("RUNMC,") for row in evaluated)


def test_job_without_data_stops_and_says_where_it_looked(fl_data, tmp_path):
    (tmp_path / "no_data").mkdir()  # a data folder without the job's partition
    with pytest.raises(DataError, match="holds no partition"):  # `fedfms job` refuses it at once ...
        job_copy("fedmsa_prostate", tmp_path, tmp_path / "no_data", rounds=1)
    # ... and a job edited by hand to point there stops at the sites, saying where they looked.
    job_dir = job_copy("fedmsa_prostate", tmp_path, fl_data / "data", rounds=1)
    config = job_dir / "app/config/config_fed_client.json"
    config.write_text(config.read_text().replace(str(fl_data / "data"), str(tmp_path / "no_data")))
    log = simulate(job_dir, tmp_path / "ws", 2, expect_success=False)
    assert f"{tmp_path / 'no_data' / 'partitions' / 'natural'}: no such partition folder; run `fedfms prepare` and `fedfms partition`" in log
    status = json.loads((tmp_path / "ws" / APP / "run_status.json").read_text())
    assert status["status"] == "ended_early" and "0 acceptable updates of 2 sites" in status["reason"]
    assert not (tmp_path / "ws" / APP / "final_test.json").exists()  # no site could score anything
    assert main(["report", str(tmp_path / "ws")]) == 4


def test_site_names_map_onto_prepared_datalists(fl_data):
    folder = fl_data / "data" / "partitions" / "natural"
    assert site_datalist("site-1", folder) == "BMC" and site_datalist("site-3", folder) == "RUNMC"
    assert site_datalist("I2CVB", folder) == "I2CVB"
    with pytest.raises(ValueError, match="no datalist for site 'site-9'"):
        site_datalist("site-9", folder)
    loso = fl_data / "data" / "partitions" / "loso"
    assert site_datalist("RUNMC", loso) == "unseen" and site_datalist("site-2", loso) == "I2CVB"


def test_report_without_a_run_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no round_metrics.json" in capsys.readouterr().err
