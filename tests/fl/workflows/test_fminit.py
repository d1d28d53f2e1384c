"""The FM-instructed-init job through the real `nvflare simulator`: pre-stage, round 0 and bad inputs."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedfms.bundle import bundle_network, bundle_parser
from fedfms.data.partition import PartitionOptions, client_datalists, partition
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate
from fedfms.fl.executors.learner import site_datalist
from fedfms.fl.site_settings import SETTINGS_ENV
from fedfms.models import count_parameters
from tests.fl.conftest import APP, check_federated_run, job_copy, simulate

pytestmark = pytest.mark.slow

STUDENT = "bundles/smlite_prostate"
CONFIGS = ["train.json", "cpu_demo.json"]
PARTITION = "partitions/age"
HOSPITALS = "partitions/natural"
PRESTAGE_EPOCHS = 5  # of the job's 20: enough to move the student, and the tests' runs stay short
CLIENTS = ("site-1", "site-2", "site-3")


@pytest.fixture(scope="module")
def fm_data(tmp_path_factory) -> Path:
    """Four sites of four cases prepared at 128 px, one proxy case per site.

    Partitions: skewed by age over 3 clients, and by hospital (4 clients); both carve the same proxy
    cases, so the teacher runs once for the module and the other runs read its cache.
    """
    root = tmp_path_factory.mktemp("fminit_data")
    synthesize_prostate(root / "raw", sites=4, cases_per_site=4, seed=7, shape=(32, 32, 8))
    prepare(root / "raw", root / "data", PrepareOptions(image_size=128, label_size=128), log=lambda _: None)
    options = PartitionOptions(method="attribute", attribute="age", num_clients=3, proxy_fraction=0.5)
    partition(root / "data", root / "data" / PARTITION, options)
    partition(root / "data", root / "data" / HOSPITALS, PartitionOptions(method="natural", proxy_fraction=0.5))
    partition(root / "data", root / "data" / "partitions" / "no_proxy", PartitionOptions(method="natural", proxy_fraction=0))
    return root / "data"


def _run(fm_data: Path, tmp_path: Path, init_mode: str, rounds: int = 1, clients: int = 3, threads: int | None = None,
         datalist_dir: str | None = None) -> tuple[str, Path]:
    job = job_copy("fminit_prostate", tmp_path, fm_data, rounds, init_mode=init_mode, datalist_dir=datalist_dir, prestage_epochs=PRESTAGE_EPOCHS)
    return simulate(job, tmp_path / "ws", clients, threads=threads), tmp_path / "ws"


def _check_run(log: str, workspace: Path, data: Path, rounds: int, sites: int, datalist_dir: str = PARTITION) -> None:
    """Every contribution of every round accepted, sample-weighted, and the final test table written."""
    run = SimpleNamespace(app=workspace / APP, log=log, data=data, datalist_dir=datalist_dir, bundle=STUDENT)
    check_federated_run(run, rounds=list(range(rounds)), sites=[f"site-{n}" for n in range(1, sites + 1)])


def _validation_dice(checkpoint: Path, data: Path, site: str) -> float:
    """The bundle's own validation of a saved global model at one site, as the client scores it before training."""
    datalist = site_datalist(site, data / PARTITION)
    parser = bundle_parser(STUDENT, CONFIGS, dataset_dir=str(data), datalist_dir=PARTITION, sites=datalist)
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    return float(evaluator.state.metrics["val_mean_dice"])


def _proxy_slices(data: Path) -> int:
    return len(json.loads((data / PARTITION / "server_proxy.json").read_text())["training"])


def _round_zero(workspace: Path) -> dict[str, float]:
    rows = json.loads((workspace / APP / "round_metrics.json").read_text())
    return {r["site"]: r["global_val_dice"] for r in rows if r["round"] == 0}


def _received(log: str) -> set[tuple[int, int]]:
    """(tensors, values) of every global model a client logged receiving."""
    return {(int(n), int(v.replace(",", ""))) for n, v in re.findall(r"global model received, (\d+) tensors, ([\d,]+) values", log)}


@pytest.fixture(scope="module")
def fm_run(fm_data, tmp_path_factory):
    return _run(fm_data, tmp_path_factory.mktemp("fm"), "fm", rounds=2)


def test_fm_prestage_distils_litemedsam_into_the_round_0_model(fm_run, fm_data):
    log, workspace = fm_run
    record = json.loads((workspace / APP / "prestage.json").read_text())
    assert record["mode"] == "fm" and record["proxy"]["slices"] == _proxy_slices(fm_data)
    assert record["teacher"]["kind"] == "litemedsam" and record["teacher"]["checkpoint"] is None  # the packaged weights
    assert Path(record["teacher"]["cache_file"]).parent == fm_data / "teacher_cache"
    assert record["teacher"]["proxy_dice"] > 0.5  # LiteMedSAM with ground-truth boxes
    assert record["student"]["proxy_dice"] > record["student"]["proxy_dice_before"]
    assert f"running the litemedsam teacher on {record['proxy']['foreground_slices']} foreground of {_proxy_slices(fm_data)} proxy slices" in log
    assert log.index("student after the fm pre-stage") < log.index("Round 0 started.")
    # Round 0 started from the distilled student, not from the bundle's random initialisation.
    initial = torch.load(workspace / APP / "initial_global_model.pt", weights_only=False)["model"]
    random_start = bundle_network(STUDENT, CONFIGS).state_dict()
    assert any(not torch.equal(torch.as_tensor(initial[k]), v) for k, v in random_start.items())
    scores = _round_zero(workspace)
    for site in CLIENTS:
        assert scores[site] == pytest.approx(_validation_dice(workspace / APP / "initial_global_model.pt", fm_data, site), abs=1e-6)


def test_clients_receive_the_students_weights_and_nothing_else(fm_run, fm_data):
    log, workspace = fm_run
    student = bundle_network(STUDENT, CONFIGS)
    tensors, values = len(list(student.parameters())), count_parameters(student).trainable
    assert _received(log) == {(tensors, values)}  # every round, validation and final test alike
    for site in CLIENTS:
        site_log = (workspace / site / "log.txt").read_text()
        assert f"global model received, {tensors} tensors, {values:,} values" in site_log
        assert "server_proxy" not in site_log and "teacher" not in site_log
        assert not list((workspace / site).rglob("teacher_*.pt"))


def test_fm_job_on_hospital_named_sites_with_the_servers_own_cache_dir(fm_run, fm_data, tmp_path):
    """Four hospitals named as deployed (natural partition with a proxy set), two client processes.

    With fewer processes than sites every task runs in a process of its own, the first of them
    already receiving the distilled student as torch tensors (bit-for-bit equality across `-t` is
    shown on the FedMSA job, tests/fl/test_jobs.py).

    Every participant reads its settings file (`$FEDFMS_SITE_SETTINGS` with `{site}`); the server's
    puts the teacher cache outside the data folder, and a copy of the module's cache there is
    found by content (the teacher does not run again)."""
    hospitals = tuple(client_datalists(fm_data / HOSPITALS))
    assert len(hospitals) == 4 and not any(h.startswith("site-") for h in hospitals)
    settings, cache = tmp_path / "settings", tmp_path / "server_cache"
    settings.mkdir()
    for site in hospitals:  # each hospital trains on its own datalist of the natural partition
        (settings / f"{site}.json").write_text(json.dumps({"datalist_dir": HOSPITALS}))
    (settings / "simulator_server.json").write_text(json.dumps({"cache_dir": str(cache), "datalist_dir": HOSPITALS}))
    cached = Path(json.loads((fm_run[1] / APP / "prestage.json").read_text())["teacher"]["cache_file"])
    cache.mkdir()
    shutil.copy(cached, cache / cached.name)
    job = job_copy("fminit_prostate", tmp_path, fm_data, 2, prestage_epochs=PRESTAGE_EPOCHS)  # the job's own partition: age
    log = simulate(job, tmp_path / "ws", hospitals, threads=2, env={SETTINGS_ENV: str(settings / "{site}.json")})
    assert f"server settings of the pre-stage: datalist_dir={HOSPITALS}, cache_dir={cache} (from {settings / 'simulator_server.json'})" in log
    assert f"teacher logits reused from {cache / cached.name}" in log and "student after the fm pre-stage" in log
    record = json.loads((tmp_path / "ws" / APP / "prestage.json").read_text())
    assert record["proxy"]["datalist"] == str(fm_data / HOSPITALS / "server_proxy.json")
    run = SimpleNamespace(app=tmp_path / "ws" / APP, log=log, data=fm_data, datalist_dir=HOSPITALS, bundle=STUDENT)
    check_federated_run(run, rounds=[0, 1], sites=list(hospitals))


def test_random_init_runs_no_prestage(fm_data, tmp_path):
    log, workspace = _run(fm_data, tmp_path, "random")
    assert "initial global model: random (the bundle's network as built), no pre-stage" in log
    assert "teacher" not in log and "pre-stage (" not in log and "student after" not in log
    assert json.loads((workspace / APP / "prestage.json").read_text()) == {"mode": "random"}
    initial = torch.load(workspace / APP / "initial_global_model.pt", weights_only=False)["model"]
    random_start = bundle_network(STUDENT, CONFIGS).state_dict()
    assert all(torch.equal(torch.as_tensor(initial[k]), v) for k, v in random_start.items())
    scores = _round_zero(workspace)
    assert scores["site-1"] == pytest.approx(_validation_dice(workspace / APP / "initial_global_model.pt", fm_data, "site-1"), abs=1e-6)


def _without_foreground(data: Path, tmp_path: Path) -> str:
    """A copy of the partition whose proxy labels are all background."""
    folder = data / "partitions" / "background_proxy"
    folder.mkdir(parents=True, exist_ok=True)
    for path in (data / PARTITION).glob("*.json"):
        (folder / path.name).write_text(path.read_text())
    proxy = json.loads((folder / "server_proxy.json").read_text())
    for i, entry in enumerate(proxy["training"]):
        label = np.zeros_like(np.load(folder / entry["label"]))
        np.save(tmp_path / f"background_{i}.npy", label)
        entry["label"] = str(tmp_path / f"background_{i}.npy")
    (folder / "server_proxy.json").write_text(json.dumps(proxy))
    return "partitions/background_proxy"


# One problem through the real simulator proves the path (pre-stage error -> job stopped before round 0, named);
# every problem's message is unit-tested in tests/distillation (test_prestage.py, test_teacher_cache.py).
# Each simulator run costs about 30 s of the suite's budget; add "no proxy set" or "missing teacher" to run them here too.
@pytest.mark.parametrize("problem", ["no foreground"])
def test_bad_prestage_inputs_stop_the_job_before_round_0(problem, fm_data, tmp_path):
    datalist_dir = {"no proxy set": "partitions/no_proxy", "no foreground": None, "missing teacher": PARTITION}[problem]
    datalist_dir = datalist_dir or _without_foreground(fm_data, tmp_path)
    job = job_copy("fminit_prostate", tmp_path, fm_data, 1, datalist_dir=datalist_dir)
    if problem == "missing teacher":  # a user's edit of the job: a SAM-Med2D teacher whose file is not there
        config = job / "app/config/config_fed_server.json"
        server = json.loads(config.read_text())
        server["workflows"][0]["args"]["teacher"] = {"kind": "sam_med2d", "checkpoint": str(tmp_path / "sam-med2d_b.pth")}
        config.write_text(json.dumps(server))
    log = simulate(job, tmp_path / "ws", expect_success=False)
    named = {
        "no proxy set": f"{fm_data / 'partitions/no_proxy/server_proxy.json'}: no server proxy set",
        "no foreground": f"{fm_data / datalist_dir / 'server_proxy.json'}: none of the {_proxy_slices(fm_data)} proxy slices has foreground",
        "missing teacher": f"{tmp_path / 'sam-med2d_b.pth'}: sam_med2d teacher checkpoint not found",
    }[problem]
    assert "FM-instructed initialisation (fm) stopped the job before round 0: " + named in log, log[-3000:]
    assert "Round 0 started." not in log and "Traceback" not in log
    assert not (tmp_path / "ws" / APP / "FL_global_model.pt").exists()
