"""``fedfms simulate JOB -w WS ...``: the real ``nvflare simulator``, judged by the run's records.

``nvflare simulator`` exits 0 even when every site failed at start, so its exit code says little.
This command runs it unchanged (as a process of its own, with the same arguments), keeps its output
in ``WS/simulator.log``, then reads the records the server wrote (``run_status.json``,
``round_metrics.json``, ``final_test.json`` in ``WS/server/simulate_job/app_server``), prints
the report ``fedfms report WS`` prints and exits with a code that tells the truth:

- 0: the run completed and the final global model was scored on the sites' test splits;
- 2: bad input, found before anything starts: JOB is not a job folder, WS is a folder the
  simulator's clean-up would wipe with the job or this folder in it, or a bad ``--timeout``;
- 4: the run did not complete: no records (never started, or stopped before FedAvg ended),
  ``run_status.json`` says ``ended_early`` or ``aborted``, or there is no final test table
  (or no site scored the final model);
- 5: ``nvflare simulator`` failed: it could not be started or exited non-zero (the log's last
  lines are echoed);
- 6: the simulator ran past ``--timeout``; it was stopped with every process it started
  (its site processes run in sessions of their own, so they are found and stopped too);
- 130: interrupted (Ctrl-C); the simulator was stopped the same way.

The simulator empties its workspace when it starts, so the log is written beside it
(``WS.simulator.log``) while it runs and moved into ``WS`` when it ends, however it ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedfms.errors import DataError  # light: nothing here imports torch before the simulator starts
from fedfms.paths import find_job

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 4
EXIT_SIMULATOR_FAILED = 5
EXIT_TIMED_OUT = 6
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
LOG_NAME = "simulator.log"
TAIL_LINES = 40
ERROR_LINES = 12  # distinct ERROR messages of the log shown for a run that did not complete
MAX_ERROR_CHARS = 400
STOP_GRACE_S = 5.0  # between SIGTERM and SIGKILL
META_FILES = ("meta.json", "meta.conf", "meta.yml", "meta.yaml")
CONFIG_SUFFIXES = (".json", ".conf", ".yml", ".yaml")


def nvflare_command() -> list[str]:
    """The ``nvflare`` command of this Python environment (beside its interpreter, else on PATH)."""
    beside = Path(sys.executable).with_name("nvflare")
    found = str(beside) if beside.is_file() else shutil.which("nvflare")
    if not found:
        raise FileNotFoundError("no `nvflare` command beside this Python or on PATH; install nvflare (pip install -e .)")
    return [found]


def check_job_folder(job: str | os.PathLike) -> Path:
    """``job`` as a path, if it is an NVFlare job folder: a meta file and, for every app its
    ``deploy_map`` names, ``<app>/config`` with a ``config_fed_*`` file. Raises :class:`DataError`."""
    job = Path(job)
    if not job.is_dir():
        raise DataError(job, "no such job folder")
    metas = [job / name for name in META_FILES if (job / name).is_file()]
    if not metas:
        raise DataError(job, "not an NVFlare job folder: no meta.json (a job folder holds meta.json and <app>/config/config_fed_*.json)")
    apps = sorted(p.parent.parent.name for p in job.glob("*/config/config_fed_*") if p.suffix in CONFIG_SUFFIXES)
    if metas[0].suffix == ".json":
        try:
            meta = json.loads(metas[0].read_text())
        except ValueError as err:
            raise DataError(metas[0], f"is not valid JSON ({err})") from err
        deploy_map = meta.get("deploy_map") if isinstance(meta, dict) else None
        if not isinstance(deploy_map, dict) or not deploy_map:
            raise DataError(metas[0], "no deploy_map: it names the apps of the job and the sites they run on")
        missing = [app for app in deploy_map if app not in apps]
        if missing:
            raise DataError(job, f"meta.json deploys {', '.join(missing)}, but there is no {missing[0]}/config/config_fed_client.json or config_fed_server.json")
    elif not apps:
        raise DataError(job, "not an NVFlare job folder: no <app>/config/config_fed_*.json")
    return job


def check_workspace(workspace: str | os.PathLike, job: Path) -> Path:
    """The workspace, unless the simulator's clean-up of it (it empties it when it starts) would delete
    the folder this command runs in or the job itself. Raises :class:`DataError`."""
    workspace = Path(workspace).resolve()
    here = Path.cwd().resolve()
    if workspace == here or workspace in here.parents:
        raise DataError(workspace, "the simulator empties its workspace when it starts: give a folder of its own, not this folder or one above it")
    if workspace == job.resolve() or workspace in job.resolve().parents:
        raise DataError(workspace, f"the simulator empties its workspace when it starts, and the job {job} is inside it: give another folder")
    return workspace


@dataclass
class Judgement:
    """What the records say: the report text (None without records) and why the run is incomplete (None: complete)."""

    report: str | None
    problem: str | None


def judge(workspace: str | os.PathLike, png: str | os.PathLike | None = None, since: float | None = None) -> Judgement:
    """Judge a run by its records, as ``fedfms report`` reads them; ``since``: records older than this
    (a time stamp) belong to an earlier run."""
    from fedfms.fl.report import FINAL_COLUMNS, FINAL_TEST, FINISHED, RUN_STATUS, SERVER_APP, IncompleteRun, report, server_app_dir
    from fedfms.io import load_json

    try:
        folder = server_app_dir(workspace)
    except DataError:
        return Judgement(None, f"no records of the run (no round_metrics.json in {Path(workspace) / SERVER_APP}): "
                               "the server never started FedAvg, or stopped before its first round ended; see the log")
    if since is not None and (folder / "round_metrics.json").stat().st_mtime < since:
        return Judgement(None, f"the records in {folder} are older than this run: it wrote none; see the log")
    try:
        text = report(folder, png)
    except IncompleteRun as incomplete:
        text = str(incomplete)
    if not (folder / RUN_STATUS).is_file():
        return Judgement(text, f"no {RUN_STATUS}: the server stopped before FedAvg ended (see the log)")
    status = load_json(folder / RUN_STATUS)
    if status.get("status") not in FINISHED:
        return Judgement(text, f"the run {str(status.get('status')).replace('_', ' ')}: {status.get('reason') or 'no reason recorded'}")
    if not (folder / FINAL_TEST).is_file():
        return Judgement(text, f"no final test table ({folder / FINAL_TEST}): the run did not reach its final evaluation")
    rows = [r for r in load_json(folder / FINAL_TEST) if r.get("site") != "average"]
    if not any(r.get(k) is not None for r in rows for k in FINAL_COLUMNS):
        return Judgement(text, f"no site scored the final global model ({folder / FINAL_TEST})")
    return Judgement(text, None)


def _processes() -> list[tuple[int, str, int, int]] | None:
    """(pid, state, parent pid, process group) of every process (Linux ``/proc``; None elsewhere)."""
    if not Path("/proc/self/stat").is_file():
        return None
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        found.append((int(stat.parent.name), state, int(ppid), int(pgrp)))
    return found


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (none known without ``/proc``: then only its process group is stopped)."""
    children: dict[int, list[int]] = {}
    for child, _, parent, _ in _processes() or []:
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(groups: set[int]) -> bool:
    """Whether a process of these groups still runs (zombies, dead but not yet reaped, do not count)."""
    processes = _processes()
    if processes is None:
        return any(_signal_group(group, 0) for group in groups)
    return any(pgrp in groups and state != "Z" for _, state, _, pgrp in processes)


def _signal_group(group: int, sig: int) -> bool:
    try:
        os.killpg(group, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_tree(process: subprocess.Popen) -> None:
    """Stop the simulator and everything it started: its process group and the groups of its
    descendants (its site processes each run in a session of their own), TERM, then KILL what is left."""
    groups = {process.pid}
    for pid in _descendants(process.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never this command's own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            _signal_group(group, sig)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if process.poll() is not None and not _alive(groups):
                return
            time.sleep(0.1)
    process.wait()


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def log_errors(path: Path, limit: int = ERROR_LINES) -> list[str]:
    """The distinct ERROR messages of the log (without their time stamps), first ones first: where a site
    that failed says why (e.g. its data folder is missing), which the records only call failed or silent."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    found: dict[str, None] = {}
    for line in text.splitlines():
        _, marker, message = line.partition(" - ERROR - ")
        message = message.strip()
        if marker and message and message != "Traceback (most recent call last):":
            found.setdefault(message[:MAX_ERROR_CHARS], None)
    return list(found)[:limit]


@dataclass
class SimulatorRun:
    code: int | None  # the simulator's exit code (None: it could not be started)
    timed_out: bool
    log: Path
    seconds: float


def run_simulator(command: Sequence[str], job: Path, workspace: Path, simulator_args: Sequence[str], timeout: float | None = None,
                  stream: bool = False) -> SimulatorRun:
    """``nvflare simulator JOB -w WS ARGS`` (``command``: the ``nvflare`` command) in the current folder,
    its output kept in ``WS/simulator.log``; stopped with every process it started after ``timeout`` seconds."""
    command = [*command, "simulator", str(job), "-w", str(workspace), *simulator_args]
    running_log = workspace.with_name(f"{workspace.name}.{LOG_NAME}")  # the simulator empties WS when it starts
    running_log.parent.mkdir(parents=True, exist_ok=True)
    print("running: " + " ".join(command), flush=True)
    print(f"log: {workspace / LOG_NAME} ({running_log} while it runs)", flush=True)
    clock = time.monotonic()
    timed_out, code = False, None
    with open(running_log, "wb") as log, open(running_log, "rb") as reader:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                try:
                    code = process.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
                if stream:
                    _echo(reader)
                if code is not None:
                    break
                if timeout and time.monotonic() - clock > timeout:
                    timed_out = True
                    stop_tree(process)
                    code = process.returncode
                    break
        except BaseException:  # interrupted: leave nothing running
            stop_tree(process)
            raise
        finally:
            if stream:
                _echo(reader)
            log.flush()
            workspace.mkdir(parents=True, exist_ok=True)
            shutil.move(str(running_log), workspace / LOG_NAME)
    return SimulatorRun(code, timed_out, workspace / LOG_NAME, time.monotonic() - clock)


def _echo(reader) -> None:
    data = reader.read()
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()


def simulate(job: str | os.PathLike, workspace: str | os.PathLike, simulator_args: Sequence[str] = (), timeout: float | None = None,
             png: str | os.PathLike | None = None, stream: bool = False) -> int:
    """Run the job in the simulator, print its report and say whether it completed; the exit code (module docstring)."""
    job = check_job_folder(find_job(job))
    workspace = check_workspace(workspace, job)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    try:
        command = nvflare_command()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SIMULATOR_FAILED
    started = time.time()
    try:
        run = run_simulator(command, job, workspace, simulator_args, timeout, stream)
    except KeyboardInterrupt:
        print(f"\nfedfms simulate: interrupted; nvflare simulator was stopped with every process it started; log: {workspace / LOG_NAME}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    verdict = judge(workspace, png, since=started - 1)
    if verdict.report:
        print(verdict.report)
    problems = []
    if run.timed_out:
        problems.append(f"nvflare simulator ran past --timeout {timeout:g} s and was stopped with every process it started")
    elif run.code != 0:
        problems.append(f"nvflare simulator exited with code {run.code}")
    if verdict.problem:
        problems.append(verdict.problem)
    if not problems:
        print(f"\nrun completed in {run.seconds:.0f} s; log: {run.log}")
        return EXIT_OK
    code = EXIT_TIMED_OUT if run.timed_out else EXIT_SIMULATOR_FAILED if run.code != 0 else EXIT_INCOMPLETE
    if code != EXIT_INCOMPLETE or verdict.report is None:
        print(f"\nlast lines of {run.log}:\n{log_tail(run.log)}", file=sys.stderr)
    errors = log_errors(run.log)
    if errors:
        print(f"\nerrors in {run.log} (the first {len(errors)} distinct ones):", file=sys.stderr)
        print("\n".join(f"  {e}" for e in errors), file=sys.stderr)
    print(f"\nfedfms simulate: the run did not complete (exit {code}): " + "; ".join(problems) + f"\nlog: {run.log}", file=sys.stderr)
    return code
