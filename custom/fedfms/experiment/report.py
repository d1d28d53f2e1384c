"""The report of an experiment folder: tables (Markdown, CSV, JSON) and figures (PNG) in ``<out>/report``, from the cells' results.

It reads only ``experiment.json`` and each ``cells/<id>/result.json`` (and the cells' saved
qualitative slices), so it runs anywhere, at any time, without a model or the data: after
every run of ``fedfms experiment``, with ``fedfms experiment CONFIG --report``, or with
``fedfms report EXPERIMENT_DIR``. Cells without a result are listed as pending.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedfms.errors import DataError
from fedfms.experiment.figures import write_figures
from fedfms.experiment.runner import EXPERIMENT_FILE, read_result
from fedfms.experiment.tables import build_tables, write_tables
from fedfms.io import load_json

REPORT_DIR = "report"


def is_experiment_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an experiment's output folder (it holds ``experiment.json``)."""
    return (Path(path) / EXPERIMENT_FILE).is_file()


def load_results(out: Path) -> tuple[dict, list[dict]]:
    """The experiment record and every cell's result in the experiment's order (pending cells as such)."""
    if not is_experiment_dir(out):
        raise DataError(out, f"not an experiment folder (no {EXPERIMENT_FILE}); run `fedfms experiment CONFIG --out {out}` first")
    record = load_json(out / EXPERIMENT_FILE)
    results = []
    for cell_id in record["cells"]:
        result = read_result(out, cell_id)
        results.append(result or {"cell": {"id": cell_id, "setting": cell_id.rsplit("-", 1)[-1]}, "status": "pending"})
    return record, results


def write_report(out: str | os.PathLike) -> tuple[str, list[Path]]:
    """Write the tables and figures of the experiment in ``out``; the Markdown text and the files written."""
    out = Path(out).resolve()
    record, results = load_results(out)
    folder = out / REPORT_DIR
    counts = {s: sum(r.get("status") == s for r in results) for s in ("ok", "failed", "pending")}
    header = (
        f"# Experiment {record['name']}\n\n"
        + (f"{record['description']}\n\n" if record.get("description") else "")
        + f"From {record['config']} (profile {record.get('profile')}): {len(results)} cells, "
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['pending']} pending. Results: {out}/cells/<id>/result.json\n\n"
    )
    tables = build_tables(results, record.get("target_dice", 0.7))
    files = write_tables(tables, folder, header)
    files += write_figures(results, out, folder)
    return (folder / "tables.md").read_text(), files
