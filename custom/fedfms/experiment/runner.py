"""Run an experiment's cells one at a time, each in a process of its own; skip finished cells, record failed ones.

Layout of the output folder::

    <out>/experiment.json          what was run: the file, its cells in order, the report's target
    <out>/cells/<id>/cell.json     the cell's definition (its process reads it)
    <out>/cells/<id>/log.txt       everything the cell's process (and its simulator) printed
    <out>/cells/<id>/result.json   status ok/failed, reason, seconds, metrics (fedfms.experiment.cell)
    <out>/report/                  tables and figures (fedfms.experiment.report)

A cell is finished when its ``result.json`` says ``ok`` for the same definition; anything else
(no result, failed, a changed definition) runs again, in a clean folder. A cell whose process
dies without a result, or runs past ``cell_timeout``, is recorded failed by the runner. A failed
cell's result keeps the tail of its log, and the log stays in the cell folder; the other cells
still run. After each cell one progress line: index/total, id, status, its seconds, the elapsed
time, and the time left estimated from the mean of the cells run so far.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean

from fedfms.errors import DataError
from fedfms.experiment.cell import CELL_FILE, LOG, RESULT, SCHEMA, json_safe, now
from fedfms.experiment.cells import cell_dir, expand_cells, select_cells
from fedfms.experiment.config import ExperimentConfig
from fedfms.io import load_json, save_json

EXPERIMENT_FILE = "experiment.json"
LOG_TAIL_LINES = 40
STOP_GRACE_S = 10  # seconds between asking a timed-out cell to stop and killing it


def experiment_out(config: ExperimentConfig, out: str | os.PathLike | None = None) -> Path:
    """The output folder: ``out`` if given, else the file's ``out``, else ``experiments/<name>``."""
    return Path(out or config.out or Path("experiments") / config.name).resolve()


def read_result(out: Path, cell_id: str) -> dict | None:
    """A cell's result, or None when it has none (not run, or its file cannot be read)."""
    try:
        return load_json(cell_dir(out, cell_id) / RESULT)
    except DataError:
        return None


def cell_state(out: Path, cell: dict) -> str:
    """``done`` (ok, same definition), ``changed`` (ok for another definition), ``failed`` or ``pending``."""
    result = read_result(out, cell["id"])
    if result is None:
        return "pending"
    if result.get("status") != "ok":
        return "failed"
    return "done" if result.get("cell") == cell else "changed"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (empty if there is none)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def write_experiment(config: ExperimentConfig, out: Path, cells: Sequence[dict]) -> None:
    """``experiment.json``: the cells in order (the report's row order) and what the report needs of the file."""
    record = {
        "name": config.name, "description": config.description, "config": str(config.path), "profile": config.profile,
        "target_dice": config.target_dice, "cells": [c["id"] for c in cells], "updated": now(),
    }
    save_json(out / EXPERIMENT_FILE, record)


def run_cell_process(cell: dict, out: Path, timeout: int | None) -> dict:
    """Run one cell in a fresh folder and process; its result, completed by the runner when the process could not."""
    folder = cell_dir(out, cell)
    if folder.exists():
        shutil.rmtree(folder)  # a failed or outdated attempt: start clean (the job copy must not exist)
    folder.mkdir(parents=True)
    save_json(folder / CELL_FILE, cell)
    clock = time.monotonic()
    with open(folder / LOG, "w") as log:
        # Its own session: a timeout stops the cell and everything it started (the simulator's processes).
        process = subprocess.Popen(
            [sys.executable, "-m", "fedfms.experiment.cell", str(folder / CELL_FILE)],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        code, stopped = _wait(process, timeout)
    result = read_result(out, cell["id"])
    if result is None or result.get("cell") != cell:
        why = f"stopped after {timeout} s (cell_timeout)" if stopped else f"the cell process exited with code {code} without writing {RESULT}"
        result = {"schema": SCHEMA, "cell": cell, "status": "failed", "reason": why, "seconds": round(time.monotonic() - clock, 1)}
    if result["status"] != "ok":
        result["log"] = str((folder / LOG).relative_to(out))
        result["log_tail"] = log_tail(folder / LOG)
        save_json(folder / RESULT, json_safe(result))
    return result


def _wait(process: subprocess.Popen, timeout: int | None) -> tuple[int | None, bool]:
    """The exit code, and whether the process had to be stopped (timeout, or this runner interrupted)."""
    try:
        return process.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        _stop(process)
        return process.returncode, True
    except BaseException:
        _stop(process)
        raise


def _stop(process: subprocess.Popen) -> None:
    """Stop the cell's process group (the cell and what it started): TERM, then KILL after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def progress_line(index: int, total: int, cell_id: str, status: str, seconds: float | None, elapsed: float, times: Sequence[float], left: int) -> str:
    """``[3/12] fedmsa-federated ok 52 s | elapsed 4 min 10 s | about 7 min 48 s left (9 cells x 52 s)``."""
    took = f" {duration(seconds)}" if seconds is not None else ""
    if not left:
        estimate = "nothing left"
    elif times:
        estimate = f"about {duration(fmean(times) * left)} left ({left} cells x {duration(fmean(times))})"
    else:
        estimate = f"{left} cells left (estimate after the first run)"
    return f"[{index}/{total}] {cell_id} {status}{took} | elapsed {duration(elapsed)} | {estimate}"


def run_experiment(config: ExperimentConfig, out: str | os.PathLike | None = None, only: Sequence[str] | None = None,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Run the cells not finished yet (those matching ``only``, shell patterns on ids); every selected cell's result."""
    out = experiment_out(config, out)
    cells = expand_cells(config)
    selected = select_cells(cells, only)
    out.mkdir(parents=True, exist_ok=True)
    write_experiment(config, out, cells)
    states = {c["id"]: cell_state(out, c) for c in selected}
    todo = sum(s != "done" for s in states.values())
    log(f"experiment {config.name} ({config.path}): {len(selected)} cells, {todo} to run, {len(selected) - todo} finished earlier -> {out}")
    clock, times, results = time.monotonic(), [], []
    for index, cell in enumerate(selected, start=1):
        if states[cell["id"]] == "done":
            result = read_result(out, cell["id"])
            log(progress_line(index, len(selected), cell["id"], "finished earlier, skipped", None, time.monotonic() - clock, times, todo - len(times)))
        else:
            why = {"failed": " (failed before: again)", "changed": " (definition changed: again)"}.get(states[cell["id"]], "")
            log(f"[{index}/{len(selected)}] {cell['id']}: running{why}, log {cell_dir(out, cell) / LOG}")
            started = time.monotonic()
            result = run_cell_process(cell, out, config.cell_timeout)
            times.append(time.monotonic() - started)  # the whole process, start-up included: what the rest will cost
            status = "ok" if result["status"] == "ok" else f"FAILED: {(result.get('reason') or '').splitlines()[0][:200]}"
            log(progress_line(index, len(selected), cell["id"], status, times[-1], time.monotonic() - clock, times, todo - len(times)))
        results.append(result)
    failed = [r["cell"]["id"] for r in results if r["status"] != "ok"]
    log(f"{len(results) - len(failed)} of {len(results)} cells ok" + (f"; failed: {', '.join(failed)} (reasons in their result.json and log.txt)" if failed else ""))
    return results
