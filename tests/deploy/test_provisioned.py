"""A provisioned NVFlare project on localhost: real server and client processes run a shipped job.

What a deployment goes through, end to end: ``fedfms deploy-template`` writes the project file and
the submit script, ``nvflare provision`` writes the startup kits, each participant starts from its
kit's ``startup/start.sh``, the admin submits a job with the README's FLARE API snippet as written
(the shipped ``submit_job.py`` is checked on a bad job folder) and downloads the result, and the
result holds the model and the records the simulator tests check. One hospital's settings point at a data folder that does not exist: the run goes on
without it, and its own error reaches the server's records and ``fedfms report``. Every wait is
bounded, failures show the tails of the participants' logs, and every process the test started is
stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from nvflare.fuel.flare_api.flare_api import Session, new_secure_session
from nvflare.lighter.utils import update_storage_locations

from fedfms.cli import main
from fedfms.fl.site_settings import SETTINGS_FILE
from tests.fl.conftest import LOG_FAILURES, check_federated_run, job_copy  # a downloaded run is judged as a simulated one

pytestmark = [
    pytest.mark.slow,  # provisions a project and runs real server and client processes
    pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning"),  # inside the FLARE API's client
]

NVFLARE = Path(sys.executable).with_name("nvflare")
SITES = ("RUNMC", "BMC")  # client names = datalist names of the synthetic data
MISCONFIGURED = "HK"  # its settings name a data folder that does not exist
ADMIN = "admin@fedfms.org"  # project_admin: may submit bring-your-own-code jobs
MARKER = "FEDFMS_DEPLOY_TEST"  # in the environment of every process this test starts, and inherited by theirs
CONNECT_TIMEOUT = 60.0  # s for the server to answer and both clients to register
JOB_TIMEOUT = 120.0  # s for the 2-round job
GRACE = 10.0  # s between SIGTERM and SIGKILL


@dataclass
class Kits:
    """Startup kit folders, ``<workspace>/<project>/prod_NN/<participant>``."""

    server: Path
    clients: dict[str, Path]
    admin: Path

    def all(self) -> list[Path]:
        return [self.server, *self.clients.values()]

    @property
    def submit_script(self) -> Path:
        return self.admin.parents[3] / "submit_job.py"  # written beside project.yml by `fedfms deploy-template`



@dataclass
class Deployment:
    kits: Kits
    session: Session  # the project admin's FLARE API session


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now, so parallel or leftover runs do not collide."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def reduced_project(project_file: Path, ports: list[int]) -> dict:
    """The shipped project reduced to the server, the test sites and the project admin, on free ports."""
    project = yaml.safe_load(project_file.read_text())
    keep = {*SITES, MISCONFIGURED, ADMIN}
    project["participants"] = [p for p in project["participants"] if p["type"] == "server" or p["name"] in keep]
    server = next(p for p in project["participants"] if p["type"] == "server")
    server["fed_learn_port"], server["admin_port"] = ports
    return project


def provision(folder: Path) -> Kits:
    """The packaged template (`fedfms deploy-template`), on free ports, provisioned as an operator does."""
    assert main(["deploy-template", "--out", str(folder)]) == 0
    project_file = folder / "project.yml"
    project = reduced_project(project_file, free_ports(2))
    project_file.write_text(yaml.safe_dump(project))
    result = subprocess.run([str(NVFLARE), "provision", "-p", str(project_file), "-w", str(folder / "workspace")],
                            cwd=folder, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    prod = sorted((folder / "workspace" / project["name"]).glob("prod_*"))[-1]  # prod_00 on a fresh workspace
    server = next(p["name"] for p in project["participants"] if p["type"] == "server")
    kits = Kits(prod / server, {site: prod / site for site in (*SITES, MISCONFIGURED)}, prod / ADMIN)
    # The kit's job and snapshot stores default to /tmp/nvflare/..., shared by every project on the
    # machine; keep them in this workspace (what `nvflare poc prepare` does for its server).
    update_storage_locations(str(kits.server / "local"), str(kits.server))
    return kits


def child_env(marker: str) -> dict[str, str]:
    """The kits' scripts call `python3`: make it this interpreter, with this PYTHONPATH (the fedfms under test)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[MARKER] = marker
    return env


def start(kit: Path, env: dict[str, str]) -> subprocess.Popen:
    """`startup/start.sh` as an operator runs it, in a session of its own so its whole process group can be signalled.

    start.sh backgrounds sub_start.sh (a restart loop around the server or client process) and
    exits; both stay in the process group whose id is start.sh's pid.
    """
    with open(kit / "start_output.txt", "wb") as output:
        return subprocess.Popen([str(kit / "startup" / "start.sh")], cwd=kit, env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes started by this test or by its processes, found by the marker in their environment.

    Job processes are started by NVFlare in sessions of their own (setsid), so they are not in the
    process groups the test started; they inherit its environment, though.
    """
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get(MARKER) == marker:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def process_groups(marker: str) -> set[int]:
    groups = set()
    for process in marked_processes(marker):
        try:
            groups.add(os.getpgid(process.pid))
        except ProcessLookupError:  # ended since it was listed
            continue
    return groups


def signal_all(started: list[subprocess.Popen], marker: str, sig: int) -> None:
    """Signal the groups of the started scripts (pgid = start.sh's pid) and those of the job processes."""
    for group in {p.pid for p in started} | process_groups(marker):
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            continue


def stop(started: list[subprocess.Popen], marker: str) -> list[psutil.Process]:
    """SIGTERM every process group the test started or that its processes made, SIGKILL what is left after GRACE.

    Returns the processes still alive afterwards (none, normally).
    """
    signal_all(started, marker, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    if marked_processes(marker):
        signal_all(started, marker, signal.SIGKILL)
        psutil.wait_procs(marked_processes(marker), timeout=GRACE)
    for process in started:
        process.wait(timeout=GRACE)  # reap start.sh itself
    return marked_processes(marker)


def log_tails(kits: Kits, chars: int = 2000) -> str:
    """The end of each participant's logs: the parent process's and each job's ``log.txt``, and start.sh's output."""
    parts = []
    for kit in kits.all():
        for log in [kit / "start_output.txt", kit / "log.txt", *sorted(kit.glob("*/log.txt"))]:
            if log.is_file():
                parts.append(f"--- {log} ---\n{log.read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


@contextmanager
def logs_on_failure(kits: Kits):
    """Any failure inside says what the participants logged."""
    try:
        yield
    except Exception as error:
        raise AssertionError(f"{type(error).__name__}: {error}\n{log_tails(kits)}") from error


def wait_for_clients(session: Session, sites: tuple[str, ...], timeout: float) -> set[str]:
    """Poll the server until every site has registered; return the names it knows."""
    deadline = time.monotonic() + timeout
    while True:
        connected = {c.name for c in session.get_system_info().client_info}
        if set(sites) <= connected or time.monotonic() > deadline:
            return connected
        time.sleep(1)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Server and clients started from their provisioned kits, and an admin session; all stopped afterwards."""
    folder = tmp_path_factory.mktemp("provisioned")
    started_at = time.monotonic()
    kits = provision(folder)
    print(f"provisioned in {time.monotonic() - started_at:.1f} s")
    marker, started, session = uuid.uuid4().hex, [], None
    try:
        env = child_env(marker)
        started.append(start(kits.server, env))
        started += [start(kit, env) for kit in kits.clients.values()]
        with logs_on_failure(kits):
            session = new_secure_session(ADMIN, str(kits.admin), timeout=CONNECT_TIMEOUT)  # retries until the server answers
            connected = wait_for_clients(session, (*SITES, MISCONFIGURED), CONNECT_TIMEOUT)
            assert {*SITES, MISCONFIGURED} <= connected, f"connected: {sorted(connected)}"
            # The marker finds every started process group, so the final "nothing left" check means something.
            assert process_groups(marker) >= {p.pid for p in started}
        print(f"server and clients up in {time.monotonic() - started_at:.1f} s")
        yield Deployment(kits, session)
    finally:
        if session is not None:
            session.close()
        stopping = time.monotonic()
        left = stop(started, marker)
        print(f"stopped in {time.monotonic() - stopping:.1f} s")
        assert not left, f"still running after SIGKILL: {[(p.pid, p.name()) for p in left]}"


@dataclass
class DownloadedRun:
    """A job's result as the admin downloads it, in the shape ``check_federated_run`` reads."""

    app: Path  # <admin kit>/transfer/<job id>/workspace/app_server
    log: str  # the server job's log.txt
    data: Path
    datalist_dir: str
    bundle: str


def downloaded_run(result: Path, data: Path, job_dir: Path) -> DownloadedRun:
    learner = json.loads((job_dir / "app/config/config_fed_client.json").read_text())["components"][0]["args"]
    log = (result / "workspace" / "log.txt").read_text()
    return DownloadedRun(result / "workspace" / "app_server", log, data, learner["datalist_dir"], learner["bundle_root"])


def client_job_logs(kits: Kits, job_id: str) -> dict[str, str]:
    """Each client's log of the job, ``<client kit>/<job id>/log.txt`` (clients keep theirs; only the server's is downloaded)."""
    return {site: (kit / job_id / "log.txt").read_text() for site, kit in kits.clients.items()}


README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET_KIT = Path("deploy/workspace/fedfms/prod_00/admin@fedfms.org")  # the paths the README's FLARE API snippet names
SNIPPET_JOB = Path("my_jobs/fedunet")


def readme_snippet() -> str:
    """The README's FLARE API snippet, verbatim: the python block that calls new_secure_session."""
    blocks = [b.split("```", 1)[0] for b in README.read_text().split("```python\n")[1:]]
    return next(b for b in blocks if "new_secure_session" in b)


def run_readme_snippet(kits: Kits, job_dir: Path, folder: Path) -> tuple[str, Path]:
    """Run the snippet as written, from a folder where its relative paths lead to the kit and the job; the status and result."""
    (folder / SNIPPET_KIT).parent.mkdir(parents=True)
    (folder / SNIPPET_KIT).symlink_to(kits.admin)
    (folder / SNIPPET_JOB).parent.mkdir(parents=True)
    (folder / SNIPPET_JOB).symlink_to(job_dir)
    result = subprocess.run([sys.executable, "-c", readme_snippet()], cwd=folder, capture_output=True, text=True, timeout=JOB_TIMEOUT + 60)
    assert result.returncode == 0, result.stdout + result.stderr
    status, downloaded = result.stdout.split()[-2:]
    return status, Path(downloaded)


def test_submit_script_reports_a_bad_job_folder_and_exits(deployment, tmp_path):
    """The shipped submit script on a folder that is no job: the FLARE API's error, and the process ends (its session closed)."""
    kits = deployment.kits
    result = subprocess.run([sys.executable, str(kits.submit_script), str(kits.admin), "no_such_job"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and f"'{tmp_path / 'no_such_job'}' is not a valid folder" in result.stderr, result.stderr[-2000:]


def point_sites_at_their_data(kits: Kits, data: Path, job_dir: Path) -> None:
    """Each hospital's own ``local/fedfms_site.json``; the job's data path then leads nowhere, so the sites must use theirs.

    The misconfigured hospital names a folder that does not exist."""
    for site, kit in kits.clients.items():
        dataset_dir = "/no/such/data/at/HK" if site == MISCONFIGURED else str(data)
        (kit / "local" / SETTINGS_FILE).write_text(json.dumps({"dataset_dir": dataset_dir, "num_threads": 1}))
    config = job_dir / "app/config/config_fed_client.json"
    config.write_text(config.read_text().replace(str(data), "/no/such/data"))


def test_provisioned_project_runs_the_fedunet_job(deployment, deploy_data, tmp_path, capsys):
    kits, started_at = deployment.kits, time.monotonic()
    job_dir = job_copy("fedunet_prostate", tmp_path, deploy_data, rounds=2)
    point_sites_at_their_data(kits, deploy_data, job_dir)
    missing = f"site {MISCONFIGURED}: no prepared data folder here (dataset_dir, set in {kits.clients[MISCONFIGURED] / 'local' / SETTINGS_FILE})"
    with logs_on_failure(kits):
        status, result = run_readme_snippet(kits, job_dir, tmp_path / "admin")
        job_id = result.name
        assert status == "FINISHED:COMPLETED"
        print(f"job {job_id} ran and was downloaded in {time.monotonic() - started_at:.1f} s")
        # The admin's copy: <admin kit>/transfer/<job id>/{job,workspace}; the server app folder is workspace/app_server.
        assert result == kits.admin / "transfer" / job_id
        run = downloaded_run(result, deploy_data, job_dir)
        check_federated_run(run, rounds=[0, 1], sites=list(SITES), failed_sites={MISCONFIGURED: missing})
        model = torch.load(run.app / "FL_global_model.pt", weights_only=False)["model"]
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in model.values())
        rows = json.loads((run.app / "round_metrics.json").read_text())
        assert {(r["site"], r["data"]) for r in rows if r["status"] == "accepted"} == {(s, s) for s in SITES}  # each on its own datalist
        assert main(["report", str(result)]) == 0  # `fedfms report` reads the downloaded job folder as it lands
        report = capsys.readouterr().out
        assert "2 of 3 sites" in report and "NEVER CONTRIBUTED: 1 site(s)" in report
        assert any(line.startswith(f"  {MISCONFIGURED}: failed in round 1: ") and missing in line for line in report.splitlines())
        client_logs = client_job_logs(kits, job_id)
        for site in SITES:
            settings = kits.clients[site] / "local" / SETTINGS_FILE
            assert f"site settings of {site}: dataset_dir={deploy_data}, num_threads=1 (from {settings})" in client_logs[site]
        assert missing in client_logs[MISCONFIGURED]
        server_log = "\n".join(line for line in run.log.splitlines() if MISCONFIGURED not in line)  # its failures are expected
        for name, log in {"server": server_log, **{s: client_logs[s] for s in SITES}}.items():
            found = [failure for failure in LOG_FAILURES if failure in log]
            assert not found, f"{name} job log: {found}"
