"""Running shipped jobs through the real `nvflare simulator`, as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfms.data.partition import PartitionOptions, partition
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate
from fedfms.fl.job_config import JobOptions, configure_job

REPO = Path(__file__).resolve().parents[2]
NVFLARE = Path(sys.executable).with_name("nvflare")
LOG_FAILURES = ("Unsuccessful callback", "FOBS protocol error", "Could not start", "failed to download", "Traceback", "Empty result from client", "accepted=False")
APP = Path("server/simulate_job/app_server")


def job_copy(job: str, tmp_path: Path, dataset_dir: Path, rounds: int, **options) -> Path:
    """The shipped job, configured for the test's data and round count as a user would (`fedfms job`)."""
    return configure_job(REPO / "jobs" / job, tmp_path / job, JobOptions(dataset_dir=str(dataset_dir), num_rounds=rounds, **options))


def simulate(job_dir: Path, workspace: Path, clients: int | tuple[str, ...] = 3, expect_success: bool = True, env: dict | None = None) -> str:
    """Run the simulator from the repository root (``env``: added variables); on expected success, check the exit code and the log."""
    names = ["-c", ",".join(clients)] if isinstance(clients, tuple) else ["-n", str(clients)]
    threads = len(clients) if isinstance(clients, tuple) else clients
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
