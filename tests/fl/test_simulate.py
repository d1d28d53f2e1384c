"""``fedfms simulate``: the simulator's run judged by its records, with an exit code that tells the truth.

The real ``nvflare simulator`` runs a tiny U-Net job twice on one site (slow): once to completion
(exit 0, the report), once with its data folder missing, which fails the site at start (exit 4
and the site's own error). A stand-in simulator (a short script) covers the other verdicts in
milliseconds: records that stop early, a simulator that exits non-zero, one that hangs past
``--timeout`` with a site process in a session of its own, and records left by an earlier run.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

import fedfms.fl.simulate as simulate_module
from fedfms.cli import main
from tests.fl.conftest import APP, REPO, job_copy

# A stand-in for `nvflare simulator JOB -w WS ...`: empties WS as the real one does, then does what JOB/fake.json says.
FAKE_SIMULATOR = r'''
import json, shutil, subprocess, sys, time
from pathlib import Path
job, workspace = Path(sys.argv[2]), Path(sys.argv[sys.argv.index("-w") + 1])
plan = json.loads((job / "fake.json").read_text())
if not plan.get("keep_workspace"):
    shutil.rmtree(workspace, ignore_errors=True)
print("fake simulator", " ".join(sys.argv[1:]), flush=True)
app = workspace / "server" / "simulate_job" / "app_server"
for name, records in plan.get("records", {}).items():
    app.mkdir(parents=True, exist_ok=True)
    (app / name).write_text(json.dumps(records))
for line in plan.get("lines", []):
    print(line, flush=True)
if plan.get("site_process"):  # like NVFlare's site processes: a session of its own
    site = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    Path(plan["site_process"]).write_text(str(site.pid))
time.sleep(plan.get("sleep", 0))
sys.exit(plan.get("exit", 0))
'''

ROUNDS = [{"round": 0, "site": "site-1", "global_val_dice": 0.5, "status": "accepted", "accepted": True, "bytes_received": 100, "reason": None}]
FINAL = [{"site": "site-1", "dice_2d": 0.6, "note": None}, {"site": "average", "dice_2d": 0.6, "note": "1 of 1 sites"}]
COMPLETED = {"status": "completed", "reason": "all 1 rounds"}
COMPLETE_RUN = {"round_metrics.json": ROUNDS, "run_status.json": COMPLETED, "final_test.json": FINAL}


@pytest.fixture
def fake_job(tmp_path, monkeypatch):
    """A job folder run by the stand-in simulator; call it with the stand-in's plan."""
    script = tmp_path / "fake_nvflare.py"
    script.write_text(FAKE_SIMULATOR)
    monkeypatch.setattr(simulate_module, "nvflare_command", lambda: [sys.executable, str(script)])

    def make(**plan) -> Path:
        job = tmp_path / "job"
        (job / "app" / "config").mkdir(parents=True, exist_ok=True)
        (job / "meta.json").write_text(json.dumps({"name": "job", "deploy_map": {"app": ["@ALL"]}}))
        (job / "app" / "config" / "config_fed_client.json").write_text("{}")
        (job / "fake.json").write_text(json.dumps(plan))
        return job

    return make


def test_complete_records_exit_0_with_the_report_and_the_log_in_the_workspace(fake_job, tmp_path, capsys):
    job, ws = fake_job(records=COMPLETE_RUN, lines=["Finished FedAvg."]), tmp_path / "ws"
    assert main(["simulate", str(job), "-w", str(ws), "-n", "1", "-t", "1", "-gpu", "0", "--end_run_for_all", "--stream"]) == 0
    out = capsys.readouterr().out
    assert "fake simulator" in out and "Finished FedAvg." in out  # --stream: the simulator's output as it runs
    assert f"simulator {job} -w {ws} -n 1 -t 1 -gpu 0 --end_run_for_all" in (ws / "simulator.log").read_text()  # the same arguments
    assert "run completed: all 1 rounds" in out and "final global model on each site's test split" in out and "run completed in" in out
    assert not ws.with_name("ws.simulator.log").exists()  # moved into the workspace


@pytest.mark.parametrize("records, why", [
    ({}, "no records of the run"),
    ({"round_metrics.json": ROUNDS}, "no run_status.json: the server stopped before FedAvg ended"),
    ({**COMPLETE_RUN, "run_status.json": {"status": "ended_early", "reason": "round 0: 0 acceptable updates"}},
     "the run ended early: round 0: 0 acceptable updates"),  # even with a final test table (`fedfms report` exits 0)
    ({**COMPLETE_RUN, "run_status.json": {"status": "aborted", "reason": "the server was stopped"}}, "the run aborted: the server was stopped"),
    ({"round_metrics.json": ROUNDS, "run_status.json": COMPLETED}, "no final test table"),
    ({**COMPLETE_RUN, "final_test.json": [{"site": "site-1", "dice_2d": None, "note": "did not answer"}]}, "no site scored the final global model"),
])
def test_a_run_that_did_not_complete_exits_4_and_says_why(fake_job, tmp_path, capsys, records, why):
    job = fake_job(records=records, lines=["2026-01-01 00:00:00,000 - ERROR - initialize error from BundleLearner: DataError: no data"])
    assert main(["simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "1"]) == 4  # though the simulator exited 0
    err = capsys.readouterr().err
    assert "the run did not complete (exit 4): " + why in err
    assert "  initialize error from BundleLearner: DataError: no data" in err  # the sites' own errors from the log


def test_a_failed_simulator_exits_5_with_the_log_tail(fake_job, tmp_path, capsys):
    job = fake_job(records=COMPLETE_RUN, lines=["Simulator setup error: boom"], exit=1)
    assert main(["simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "1"]) == 5
    err = capsys.readouterr().err
    assert "nvflare simulator exited with code 1" in err and "Simulator setup error: boom" in err


def test_records_of_an_earlier_run_are_not_taken_for_this_one(fake_job, tmp_path, capsys):
    app = tmp_path / "ws" / APP
    app.mkdir(parents=True)
    for name, records in COMPLETE_RUN.items():
        (app / name).write_text(json.dumps(records))
        os.utime(app / name, (time.time() - 3600,) * 2)
    job = fake_job(keep_workspace=True, exit=1)  # stops before emptying its workspace
    assert main(["simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "1"]) == 5
    err = capsys.readouterr().err
    assert "older than this run: it wrote none" in err and "exited with code 1" in err


def test_a_hung_simulator_is_stopped_with_its_site_processes_after_the_timeout(fake_job, tmp_path, capsys):
    pid_file = tmp_path / "site.pid"
    job = fake_job(sleep=120, site_process=str(pid_file), lines=["Round 0 started."])
    clock = time.monotonic()
    assert main(["simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "1", "--timeout", "2"]) == 6
    assert time.monotonic() - clock < 30
    err = capsys.readouterr().err
    assert "ran past --timeout 2 s and was stopped with every process it started" in err
    assert "Round 0 started." in (tmp_path / "ws" / "simulator.log").read_text()
    assert not _running(int(pid_file.read_text()))


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (dead, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_folder_that_is_not_a_job_exits_2_before_starting_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(simulate_module, "nvflare_command", lambda: pytest.fail("the simulator was started"))
    assert main(["simulate", str(tmp_path / "missing"), "-w", str(tmp_path / "ws"), "-n", "1"]) == 2
    assert "missing: no such job folder" in capsys.readouterr().err
    (tmp_path / "job" / "server" / "config").mkdir(parents=True)
    (tmp_path / "job" / "meta.json").write_text(json.dumps({"deploy_map": {"app": ["@ALL"], "server": ["server"]}}))
    assert main(["simulate", str(tmp_path / "job"), "-w", str(tmp_path / "ws"), "-n", "1"]) == 2
    assert "meta.json deploys app, server, but there is no app/config/config_fed_client.json" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists() and not (tmp_path / "ws.simulator.log").exists()


def test_a_workspace_the_simulator_would_empty_with_the_job_or_this_folder_exits_2(fake_job, tmp_path, monkeypatch, capsys):
    job = fake_job(records=COMPLETE_RUN)
    monkeypatch.setattr(simulate_module, "nvflare_command", lambda: pytest.fail("the simulator was started"))
    assert main(["simulate", str(job), "-w", str(tmp_path), "-n", "1"]) == 2
    assert "the simulator empties its workspace when it starts, and the job" in capsys.readouterr().err
    monkeypatch.chdir(job)
    assert main(["simulate", ".", "-w", ".", "-n", "1"]) == 2
    assert "not this folder or one above it" in capsys.readouterr().err
    assert main(["simulate", ".", "-w", str(tmp_path / "ws"), "-n", "1", "--timeout", "0"]) == 2
    assert "--timeout must be a positive number of seconds" in capsys.readouterr().err
    assert (job / "meta.json").is_file()


def _unet_job(fl_data: Path, tmp_path: Path) -> Path:
    """The shipped FedU-Net job, 1 round of 1 local epoch on one site (the fastest shipped job on CPU)."""
    return job_copy("fedunet_prostate", tmp_path, fl_data / "data", 1, local_epochs=1, min_clients=1, task_timeout=300)


@pytest.mark.slow
def test_a_real_run_that_completes_exits_0_and_prints_its_report(fl_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    job, ws = _unet_job(fl_data, tmp_path), tmp_path / "ws"
    assert main(["simulate", str(job), "-w", str(ws), "-n", "1", "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert "run completed: all 1 rounds" in out and "contributions: 1 expected: 1 accepted" in out
    assert "\nsite-1 " in out and "\naverage " in out and "run completed in" in out
    assert "Finished FedAvg." in (ws / "simulator.log").read_text()
    assert json.loads((ws / APP / "run_status.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_real_run_whose_sites_all_fail_at_start_exits_4_and_says_why(fl_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    job = _unet_job(fl_data, tmp_path)
    config = job / "app/config/config_fed_client.json"
    config.write_text(config.read_text().replace(str(fl_data / "data"), str(tmp_path / "no_data")))  # a job edited by hand
    assert main(["simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "1", "-t", "1"]) == 4  # nvflare simulator itself exits 0
    captured = capsys.readouterr()
    assert "run ENDED EARLY: round 0: 0 acceptable updates of 1 sites" in captured.out  # the report
    assert "the run did not complete (exit 4): the run ended early: round 0: 0 acceptable updates" in captured.err
    assert f"{tmp_path / 'no_data'}: site site-1: no prepared data folder here" in captured.err  # the site's own words, from the log
    [row] = json.loads((tmp_path / "ws" / APP / "round_metrics.json").read_text())
    assert row["status"] == "failed" and f"{tmp_path / 'no_data'}: site site-1: no prepared data folder here" in row["reason"]  # the server's record
    assert "round 0 site-1: failed: the site's task ended with EXECUTION_EXCEPTION" in captured.out
    assert (tmp_path / "ws" / "simulator.log").read_text().count("Traceback") <= 2  # the failed start; later tasks fail without one
