"""Running shipped jobs through the real `nvflare simulator`, as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedfms.bundle import bundle_network
from fedfms.data.partition import PartitionOptions, partition
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate
from fedfms.fl.exchange import exchanged_keys
from fedfms.fl.job_config import JobOptions, configure_job
from fedfms.fl.executors.learner import site_datalist

REPO = Path(__file__).resolve().parents[2]
NVFLARE = Path(sys.executable).with_name("nvflare")
LOG_FAILURES = ("cannot find handler", "Error getting task", "Unsuccessful callback", "FOBS protocol error", "Could not start", "failed to download", "Traceback", "Empty result from client", "accepted=False")
APP = Path("server/simulate_job/app_server")
WIRE_OVERHEAD, WIRE_OVERHEAD_PER_TENSOR = 16_384, 512  # bytes FOBS and the Shareable's headers may add to the raw tensors


def job_copy(job: str, tmp_path: Path, dataset_dir: Path, rounds: int, **options) -> Path:
    """The shipped job, configured for the test's data and round count as a user would (`fedfms job`)."""
    return configure_job(REPO / "jobs" / job, tmp_path / job, JobOptions(dataset_dir=str(dataset_dir), num_rounds=rounds, **options))


def simulate(job_dir: Path, workspace: Path, clients: int | tuple[str, ...] = 3, expect_success: bool = True, env: dict | None = None,
             threads: int | None = None) -> str:
    """Run the simulator from the repository root (``env``: added variables); on expected success, check the exit code and the log.

    ``threads`` is the simulator's ``-t``, its number of client processes (default: one per site);
    with fewer, every site runs each task in a process of its own.
    """
    names = ["-c", ",".join(clients)] if isinstance(clients, tuple) else ["-n", str(clients)]
    threads = threads or (len(clients) if isinstance(clients, tuple) else clients)
    result = subprocess.run(
        [str(NVFLARE), "simulator", str(job_dir), "-w", str(workspace), *names, "-t", str(threads)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    log = result.stdout + result.stderr
    if expect_success:
        assert result.returncode == 0, log[-3000:]
        assert "Finished FedAvg." in log, log[-3000:]
        for failure in LOG_FAILURES:
            assert failure not in log, (failure, log[-3000:])
    return log


@pytest.fixture(scope="session")
def fl_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fl_data")
    synthesize_prostate(root / "raw", sites=3, cases_per_site=3, seed=5, shape=(32, 32, 8))
    quiet = lambda _: None  # noqa: E731
    prepare(root / "raw", root / "data", PrepareOptions(image_size=64, label_size=64), log=quiet)
    prepare(root / "raw", root / "data_stack5", PrepareOptions(image_size=64, label_size=64, num_slices=5, all_label_slices=True), log=quiet)
    partition(root / "data", root / "data" / "partitions" / "natural", PartitionOptions(method="natural", proxy_fraction=0))
    partition(root / "data", root / "data" / "partitions" / "loso", PartitionOptions(method="loso", unseen_site="RUNMC", proxy_fraction=0))
    return root


def same_model(first: Path, second: Path) -> bool:
    """Two saved global models hold exactly the same values."""
    a, b = (torch.load(path, weights_only=False)["model"] for path in (first, second))
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def exchanged(network, norm_statistics: str = "global") -> set[str]:
    return set(exchanged_keys(network, norm_statistics))


def aliases(network, keys: set[str]) -> set[str]:
    """The other state-dict names of the tensors ``keys`` name (a module registered twice, as DynUNet's ``skip_layers``)."""
    state = network.state_dict(keep_vars=True)
    pointers = {state[k].data_ptr() for k in keys}
    return {k for k, v in state.items() if v.data_ptr() in pointers} - keys


def exchanged_bytes(network, norm_statistics: str = "global") -> int:
    state, keys = network.state_dict(), exchanged(network, norm_statistics)
    return sum(state[k].numel() * state[k].element_size() for k in keys)


def check_federated_run(run, rounds: list[int], sites: list[str], norm_statistics: str = "global",
                        failed_sites: dict[str, str] | None = None) -> torch.nn.Module:
    """What every job must show: exchanged-only change, accepted sample-weighted updates of the right size, test tables.

    ``failed_sites`` maps a site that fails every task to the text its rows must carry (its own error).

    ``run`` has the server's app folder (``app``), its log, the data and partition it ran on
    (``data``, ``datalist_dir``) and the job's ``bundle``: a simulated run or a downloaded one;
    ``network`` (optional) holds the bundle overrides the job chose its network with.
    """
    initial = bundle_network(run.bundle, ["train.json", "cpu_demo.json"], **getattr(run, "network", {}))
    travelling = exchanged(initial, norm_statistics)
    assert f"global model: {len(travelling)} exchanged of {len(initial.state_dict())} tensors ({norm_statistics} normalisation statistics)" in run.log
    saved = torch.load(run.app / "FL_global_model.pt", weights_only=False)
    changed = {k for k, v in initial.state_dict().items() if not torch.equal(torch.as_tensor(saved["model"][k]), v)}
    assert changed and changed <= travelling | aliases(initial, travelling)  # frozen weights never moved; trained ones did
    assert saved["meta_props"]["completed_rounds"] == rounds[-1] + 1
    folder = run.data / run.datalist_dir
    samples = {site: len(json.loads((folder / f"{site_datalist(site, folder)}.json").read_text())["training"]) for site in sites}
    aggregation = saved["meta_props"].get("metrics_aggregation_info", {})
    if "site_weights" in aggregation:  # recorded by FedAvg's own aggregation (the LoRA-SVD aggregator has its own test)
        assert {w["name"]: w["weight"] for w in aggregation["site_weights"]} == samples
    # Every contribution was recorded and accepted, weighted by its samples, and carried exactly the exchanged bytes.
    rows = [r for r in json.loads((run.app / "round_metrics.json").read_text()) if r["round"] in rounds]
    failed_sites = failed_sites or {}
    for site, message in failed_sites.items():
        failures = [r for r in rows if r["site"] == site]
        assert [r["round"] for r in failures] == rounds and all(r["status"] == "failed" and message in r["reason"] for r in failures), failures
    rows = [r for r in rows if r["site"] not in failed_sites]
    assert sorted((r["round"], r["site"]) for r in rows) == sorted((n, s) for n in rounds for s in sites)
    assert all(r["status"] == "accepted" and r["num_train_samples"] == samples[r["site"]] for r in rows)
    size = exchanged_bytes(initial, norm_statistics)
    assert {r["bytes_received"] for r in rows} == {size}
    # Measured on the wire (FOBS-serialised, at the site): the payload plus framing, each way (uncompressed runs).
    tensors = len(travelling)
    assert all(0 < r["wire_bytes_up"] - size < WIRE_OVERHEAD_PER_TENSOR * tensors + WIRE_OVERHEAD for r in rows), rows
    assert all(0 < r["wire_bytes_down"] - size < WIRE_OVERHEAD_PER_TENSOR * tensors + WIRE_OVERHEAD for r in rows), rows
    assert all(0 <= r["global_val_dice"] <= 1 for r in rows)
    assert all(f"round {n} {site}: accepted=True, status=accepted, {size:,} bytes" in run.log for n in rounds for site in sites)
    assert json.loads((run.app / "run_status.json").read_text())["status"] == "completed"
    final = {r["site"]: r for r in json.loads((run.app / "final_test.json").read_text())}
    assert set(sites) | {"average"} <= set(final)
    assert final["average"]["dice_2d"] == pytest.approx(sum(final[s]["dice_2d"] for s in sites) / len(sites))
    return initial
