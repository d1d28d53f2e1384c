"""The papers' tables from the cells' results: Markdown, CSV and JSON.

- FedFMS Table 1 (:func:`fedfms_table`): rows FedSAM, FedMSA, SAM, MSA (centralized), their -PT
  variants, FedU-Net, FednnU-Net; columns each test site and the average. Cells map to rows by
  model, strategy, pretrained and setting: model ``sam`` with strategy ``full`` is SAM, ``msa``
  is MSA; ``federated`` adds "Fed", ``centralized`` is the bare name; ``pretrained: false`` adds
  "-PT"; ``unet``/``dynunet`` federated are FedU-Net/FednnU-Net. Shown twice: 2D Dice and 2D IoU,
  the FedFMS metrics.
- FLAP-SAM Table 1 (:func:`flapsam_table`): one row per ``flapsam`` method, named by strategy
  (full FullFT, attn AttnFT, dec DecFT, pdec PDecFT, lora LoRAFT, lora_dec LoRADecFT, flap
  FLAP-SAM; "-PT" for random weights); columns the 3D Dice (FLAP-SAM's metric, mean over the test
  sites) of its local, centralized and federated cells, trainable and total parameters, the bytes
  one site sent per round (measured in its federated cell) and how many times fewer than FullFT.
- Rounds (:func:`rounds_table`): every federated cell's mean validation Dice per round, final test
  Dice and the rounds until the mean validation Dice reaches the target (FM-instructed init's view).
- Cells (:func:`cells_table`): every cell's status, time, mean test metrics and reason.

Rows exist only for the methods present; a missing value is "-". Every table's header states its
metric and the metric's rule. If two methods map to one row name, each row gets its method's name.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedfms.experiment.cell import TEST_METRICS
from fedfms.io import atomic_write

EMPTY_RULE = "empty-slice rule: a slice (volume) whose label is empty scores 1 if nothing is predicted there, else 0"
METRIC_RULES = {
    "dice_2d": f"2D Dice per test slice, mean over a site's slices; {EMPTY_RULE}",
    "iou_2d": f"2D IoU per test slice, mean over a site's slices; {EMPTY_RULE}",
    "dice_3d": f"3D Dice per test volume (a case's slices stacked), mean over a site's volumes; {EMPTY_RULE}",
    "dice_2d_fg": "2D Dice over the test slices whose label contains the organ only",
    "fp_rate_empty": "share of the empty-label test slices with any predicted foreground",
    "hd95_3d": "95th-percentile Hausdorff distance per volume, pixels of the prepared label grid (not mm), volumes with an empty label or prediction left out",
}
AVERAGE_RULE = "average: unweighted mean over the test sites where the metric is defined"
SETTING_RULE = "local: each site's own model on its own test split; centralized: one model trained on the training sites pooled; federated: the final global model"
BYTES_RULE = (
    "bytes per round: mean tensor bytes of one site's accepted update per round as the server received it (round_metrics.json); "
    "wire bytes up: the same update as NVFlare serialised it, measured at the site (fedfms.fl.filters.wire)"
)
PARAMS_RULE = "parameters: trainable and total of the method's network (fedfms.models.count_parameters)"
VALIDATION_RULE = "validation Dice: MONAI MeanDice over the validation slices with organ (empty-label slices ignored), the global model scored at each site before local training; r0 = the initial model, the last column the final model (scored after the rounds by the final evaluation)"
FEDFMS_ROWS = ("FedSAM", "FedMSA", "SAM", "MSA", "FedSAM-PT", "FedMSA-PT", "SAM-PT", "MSA-PT", "FedU-Net", "FednnU-Net")
SAM_NAMES = {"full": "SAM", "msa": "MSA"}
FLAPSAM_NAMES = {"full": "FullFT", "attn": "AttnFT", "dec": "DecFT", "pdec": "PDecFT", "lora": "LoRAFT", "lora_dec": "LoRADecFT", "flap": "FLAP-SAM"}
FLAPSAM_SETTINGS = ("local", "centralized", "federated")


@dataclass
class Table:
    """A table: ``rows`` are dicts keyed by ``columns``; ``formats`` turn a column's values into Markdown text."""

    name: str
    title: str
    rules: list[str]
    columns: list[str]
    rows: list[dict]
    formats: dict[str, Callable] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"name": self.name, "title": self.title, "rules": self.rules, "columns": self.columns, "rows": self.rows}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _dice(value) -> str:
    return "-" if _number(value) is None else f"{value:.4f}"


def _count(value) -> str:
    return "-" if _number(value) is None else f"{int(value):,}"


def _times(value) -> str:
    return "-" if _number(value) is None else f"{value:.1f}x"


def _seconds(value) -> str:
    return "-" if _number(value) is None else f"{value:.0f}"


def ok(results: Sequence[dict]) -> list[dict]:
    return [r for r in results if r.get("status") == "ok"]


def fedfms_label(cell: dict) -> str | None:
    """The FedFMS Table 1 row of a cell, or None when the table has no such row."""
    suffix = "" if cell["pretrained"] else "-PT"
    if cell["model"] == "sam" and cell["strategy"] in SAM_NAMES and cell["setting"] in ("federated", "centralized"):
        return ("Fed" if cell["setting"] == "federated" else "") + SAM_NAMES[cell["strategy"]] + suffix
    if cell["setting"] == "federated":
        return {"unet": "FedU-Net", "dynunet": "FednnU-Net"}.get(cell["model"])
    return None


def flapsam_label(cell: dict) -> str | None:
    """The FLAP-SAM Table 1 row of a cell's method, or None for other models."""
    if cell["model"] != "flapsam":
        return None
    compress = f" {cell['compress']}" if cell.get("compress") else ""
    return FLAPSAM_NAMES.get(cell["strategy"], cell["strategy"]) + ("" if cell["pretrained"] else "-PT") + compress


def _disambiguate(labelled: list[tuple[str, str]]) -> dict[str, str]:
    """``{method: row name}``: a name two methods share gets each method's name added."""
    counts: dict[str, set[str]] = {}
    for label, method in labelled:
        counts.setdefault(label, set()).add(method)
    return {method: label if len(counts[label]) == 1 else f"{label} ({method})" for label, method in labelled}


def _order(label: str, known: Sequence[str]) -> tuple[int, int]:
    """Sort key of a row name: its place in the paper's rows; a "-PT" name the paper has no row for goes after its base."""
    base = label.split(" (")[0]
    if base in known:
        return known.index(base), 0
    stem = base.removesuffix("-PT")
    return (known.index(stem) if stem in known else len(known)), 1


def fedfms_table(results: Sequence[dict], metric: str = "dice_2d") -> Table:
    """FedFMS Table 1: one row per FedFMS row name present, columns the test sites and the average."""
    cells = [(fedfms_label(r["cell"]), r) for r in ok(results)]
    cells = [(label, r) for label, r in cells if label]
    names = _disambiguate([(label, r["cell"]["id"]) for label, r in cells])
    sites = sorted({s for _, r in cells for s in r.get("sites", {})})
    rows = []
    for _, r in sorted(cells, key=lambda item: _order(names[item[1]["cell"]["id"]], FEDFMS_ROWS)):
        row = {"method": names[r["cell"]["id"]], "cell": r["cell"]["id"]}
        row.update({s: r["sites"].get(s, {}).get(metric) for s in sites})
        row["average"] = r["average"].get(metric)
        rows.append(row)
    formats = {c: _dice for c in (*sites, "average")}
    title = f"FedFMS Table 1 layout: {metric} of each method on each test site"
    return Table(f"fedfms_table1_{metric}", title, [f"{metric}: {METRIC_RULES[metric]}", AVERAGE_RULE], ["method", "cell", *sites, "average"], rows, formats)


def flapsam_table(results: Sequence[dict], metric: str = "dice_3d") -> Table:
    """FLAP-SAM Table 1: per flapsam method, its local / centralized / federated Dice, parameters and bytes."""
    by_method: dict[str, dict[str, dict]] = {}
    for r in ok(results):
        if flapsam_label(r["cell"]):
            by_method.setdefault(r["cell"]["method"], {})[r["cell"]["setting"]] = r
    labels = _disambiguate([(flapsam_label(next(iter(s.values()))["cell"]), m) for m, s in by_method.items()])
    rows = []
    for method, settings in sorted(by_method.items(), key=lambda item: _order(labels[item[0]], list(FLAPSAM_NAMES.values()))):
        any_cell = settings.get("federated") or next(iter(settings.values()))
        params = any_cell.get("parameters") or {}
        row = {"method": labels[method], "strategy": any_cell["cell"]["strategy"], "exchange": any_cell["cell"].get("compress") or "fp32"}
        row.update({f"{s}_{metric}": settings[s]["average"].get(metric) if s in settings else None for s in FLAPSAM_SETTINGS})
        federated = settings.get("federated") or {}
        row.update({"trainable": params.get("trainable"), "total": params.get("total"), "bytes_per_round": federated.get("bytes_per_round"),
                    "wire_bytes_up_per_round": federated.get("wire_bytes_up_per_round")})
        rows.append(row)
    full = [r for r in rows if r["strategy"] == "full" and r["exchange"] == "fp32"]
    reference = next((r for r in full if r["method"] == "FullFT"), full[0] if full else None)
    for row in rows:
        row["times_fewer_bytes_than_fullft"] = _fewer(reference, row)
    columns = ["method", "strategy", "exchange", *(f"{s}_{metric}" for s in FLAPSAM_SETTINGS), "trainable", "total", "bytes_per_round", "wire_bytes_up_per_round",
               "times_fewer_bytes_than_fullft"]
    formats = {**{f"{s}_{metric}": _dice for s in FLAPSAM_SETTINGS}, "trainable": _count, "total": _count, "bytes_per_round": _count,
               "wire_bytes_up_per_round": _count, "times_fewer_bytes_than_fullft": _times}
    rules = [f"{metric}: {METRIC_RULES[metric]}; each column the {AVERAGE_RULE.split(': ', 1)[1]}", SETTING_RULE, PARAMS_RULE, BYTES_RULE,
             "exchange: fp32, or the compression of the federated exchange (`fedfms job --compress`)",
             "times fewer bytes than FullFT: FullFT's (fp32) bytes per round / the method's, measured on the wire where both were"]
    return Table("flapsam_table1", f"FLAP-SAM Table 1 layout: {metric} per setting, parameters and communication", rules, columns, rows, formats)


def _fewer(reference: dict | None, row: dict) -> float | None:
    """How many times fewer bytes ``row`` sends per round than ``reference``: measured on the wire when both were, else counted."""
    if reference is None:
        return None
    for key in ("wire_bytes_up_per_round", "bytes_per_round"):
        if _number(reference[key]) and _number(row[key]):
            return reference[key] / row[key]
    return None


def rounds_to(dice: Sequence[float | None], target: float) -> int | None:
    """The first round whose mean validation Dice reaches ``target`` (0: the initial model does); None if none does."""
    return next((n for n, d in enumerate(dice) if d is not None and d >= target), None)


def rounds_table(results: Sequence[dict], target: float = 0.7) -> Table:
    """Every federated cell's mean validation Dice per round, final test Dice, proxy Dice and rounds to ``target``."""
    federated = [r for r in ok(results) if r["cell"]["setting"] in ("federated", "loso")]
    count = max((len(r.get("rounds", [])) for r in federated), default=0)
    rows = []
    for r in federated:
        dice = {p["round"]: p["mean_global_val_dice"] for p in r.get("rounds", [])}
        series = [dice.get(n) for n in range(count)]
        row = {"cell": r["cell"]["id"], **{f"r{n}": series[n] for n in range(count)}}
        row.update({"test_dice_2d": r["average"].get("dice_2d"), "test_dice_3d": r["average"].get("dice_3d")})
        row["proxy_dice"] = (r.get("prestage") or {}).get("student_proxy_dice")
        row["rounds_to_target"] = rounds_to(series, target)
        rows.append(row)
    rounds = [f"r{n}" for n in range(count)]
    formats = {**{c: _dice for c in (*rounds, "test_dice_2d", "test_dice_3d", "proxy_dice")}, "rounds_to_target": lambda v: f">{count - 1}" if v is None else str(v)}
    rules = [VALIDATION_RULE, f"test_dice_2d, test_dice_3d: the final global model; {METRIC_RULES['dice_3d']}; {AVERAGE_RULE}",
             "proxy_dice: the pre-stage student's Dice on the server's proxy set (FM-instructed init)", f"rounds_to_target: first round whose mean validation Dice >= {target}"]
    return Table("rounds", f"federated cells: mean validation Dice of the global model per round (target {target})", rules, ["cell", *rounds, "test_dice_2d", "test_dice_3d", "proxy_dice", "rounds_to_target"], rows, formats)


def cells_table(results: Sequence[dict]) -> Table:
    """Every cell: status, seconds, the mean of each test metric over its sites, the unseen site's 3D Dice, and why it failed."""
    rows = []
    for r in results:
        cell = r["cell"]
        row = {"cell": cell["id"], "setting": cell["setting"], "status": r.get("status", "pending"), "seconds": r.get("seconds")}
        row.update({m: (r.get("average") or {}).get(m) for m in TEST_METRICS})
        unseen = r.get("unseen") or {}
        row["unseen_dice_3d"] = next(iter(unseen.values()), {}).get("dice_3d") if unseen else None
        row.update({"trainable": (r.get("parameters") or {}).get("trainable"), "bytes_per_round": r.get("bytes_per_round")})
        row["reason"] = (r.get("reason") or "").splitlines()[0][:160] if r.get("reason") else None
        rows.append(row)
    columns = ["cell", "setting", "status", "seconds", *TEST_METRICS, "unseen_dice_3d", "trainable", "bytes_per_round", "reason"]
    formats = {"seconds": _seconds, **{m: _dice for m in TEST_METRICS}, "hd95_3d": lambda v: "-" if _number(v) is None else f"{v:.2f}",
               "unseen_dice_3d": _dice, "trainable": _count, "bytes_per_round": _count}
    rules = [*(f"{m}: {rule}" for m, rule in METRIC_RULES.items()), f"each metric: {AVERAGE_RULE.split(': ', 1)[1]}",
             "unseen_dice_3d: leave-one-site-out cells, the site that never trained (not in the average)"]
    return Table("cells", "every cell: status and mean test metrics over its sites", rules, columns, rows, formats)


def build_tables(results: Sequence[dict], target_dice: float = 0.7) -> list[Table]:
    return [fedfms_table(results, "dice_2d"), fedfms_table(results, "iou_2d"), flapsam_table(results), rounds_table(results, target_dice), cells_table(results)]


def markdown(table: Table) -> str:
    """The table in Markdown, with its title and rules above it; a table without rows says so."""
    lines = [f"## {table.title}", "", *(f"- {rule}" for rule in table.rules), ""]
    if not table.rows:
        return "\n".join([*lines, "(no cells for this table)", ""])
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    for row in table.rows:
        cells = [table.formats.get(c, lambda v: "-" if v is None else str(v))(row.get(c)) for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def csv_text(table: Table) -> str:
    """The rows as CSV, full precision; empty cells for missing values."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table.columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if row.get(c) is None else row.get(c)) for c in table.columns} for row in table.rows)
    return buffer.getvalue()


def write_tables(tables: Sequence[Table], folder: Path, header: str = "") -> list[Path]:
    """``tables.md`` (all), ``<name>.csv`` each and ``tables.json`` (all), each written atomically."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    written = {folder / "tables.md": header + "\n".join(markdown(t) for t in tables)}
    written.update({folder / f"{t.name}.csv": csv_text(t) for t in tables})
    written[folder / "tables.json"] = json.dumps([t.as_json() for t in tables], indent=2) + "\n"
    for path, text in written.items():
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
    return list(written)
