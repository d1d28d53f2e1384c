"""Server-side record of every expected client contribution, and of how the run ended.

``<app_server>/round_metrics.csv`` and ``.json`` get one row per site and round, whatever
happened to its update (written after each, atomically):

    accepted    checked and aggregated
    rejected    refused by :class:`fedfms.fl.checks.updates.UpdateValidator`; ``reason`` says why
    failed      the site's task ended in an error (``reason``: NVFlare's return code and the site's message)
    timed_out   no answer within the round's task timeout, or within ``wait_time_after_min_received``
                once enough sites had answered
    lost        the site's job process stopped answering the server while it held the task
    late        an answer that came after its round had ended (not aggregated)

``weight`` is what the site's update weighed in the round's sum (FedAvg's ``NUM_STEPS_CURRENT_ROUND``;
empty when the aggregation ignores weights, e.g. a coordinate-wise median) and ``change_norm`` the
L2 norm of its change against the round's global model (see :mod:`fedfms.fl.checks.updates`).

``<app_server>/run_status.json`` says whether FedAvg completed its rounds, stopped early on
purpose (``stopped_early``: no improvement for ``patience`` rounds), ended early (too few
good updates: ``reason``), or the run was aborted (NVFlare's fatal-error reason), so a run is
judged by its records, never by the simulator's exit code. A resumed run (``resume_from``: the
earlier run's server app folder) starts with the earlier rows; the rows of the round it was
interrupted in are replaced by that round's new ones (:meth:`ContributionRecorder.forget_rounds_from`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel

from fedfms.io import load_json, save_csv, save_json
from fedfms.paths import resolve_path

COLUMNS = (
    "round", "site", "status", "reason", "data", "accepted", "num_train_samples", "weight", "change_norm",
    "bytes_received", "wire_bytes_down", "wire_bytes_up", "global_val_dice", "local_val_dice",
)
STATUSES = ("accepted", "rejected", "failed", "timed_out", "lost", "late")
RUN_STATUS = "run_status"


def payload_bytes(params: dict) -> int:
    """Bytes of a parameter dict as sent (tensors or arrays at their own dtype)."""
    total = 0
    for value in (params or {}).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        else:
            total += np.asarray(value).nbytes
    return total


def _number(value) -> float | None:
    """A metric as a JSON-safe number (NaN and non-numbers become None)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class ContributionRecorder(FLComponent):
    """Writes one row per expected contribution and the run's end state; ``file_name`` is relative to the server app folder.

    Args:
        file_name: base name of the contribution table.
        resume_from: the server app folder (or its ``round_metrics.json``) of the run this one resumes.
    """

    def __init__(self, file_name: str = "round_metrics", resume_from: str | None = None) -> None:
        super().__init__()
        self.file_name = file_name
        self.resume_from = resume_from
        self.rows: list[dict] = []
        self.folder: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.folder = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
            if self.resume_from:
                self._continue(resolve_path(self.resume_from))
        elif event_type == EventType.FATAL_SYSTEM_ERROR:
            reason = fl_ctx.get_prop(FLContextKey.EVENT_DATA, "")
            self.run_status("aborted", str(reason))

    def record(
        self, fl_ctx: FLContext, round_: int, site: str, status: str, reason: str | None = None, update: FLModel | None = None,
        weight: float | None = None, change_norm: float | None = None, wire_bytes_down: int | None = None, wire_bytes_up: int | None = None,
    ) -> dict:
        """Append the row of ``site``'s contribution to ``round_`` and rewrite the tables."""
        if status not in STATUSES:
            raise ValueError(f"unknown contribution status {status!r}; expected one of {', '.join(STATUSES)}")
        metrics, meta = (update.metrics or {}, update.meta or {}) if update is not None else ({}, {})
        row = {
            "round": round_,
            "site": site,
            "status": status,
            "reason": reason,
            "data": meta.get("datalist"),
            "accepted": status == "accepted",
            "num_train_samples": _number(meta.get("num_train_samples")),
            "weight": _number(weight),
            "change_norm": _number(change_norm),
            "bytes_received": payload_bytes(update.params) if update is not None else 0,
            "wire_bytes_down": wire_bytes_down,  # the global model as serialised to the site (fedfms.fl.filters.wire)
            "wire_bytes_up": wire_bytes_up,  # the update as serialised by the site, after its filters
            "global_val_dice": _number(metrics.get("val_mean_dice")),  # the received global model, scored before training
            "local_val_dice": _number(meta.get("local_val_dice")),
        }
        self.rows.append(row)
        weighed = f", weight {row['weight']:g}" if row["weight"] is not None else ""
        detail = f", {row['bytes_received']:,} bytes{weighed}" + (f": {reason}" if reason else "")
        log = self.log_info if status == "accepted" else self.log_warning
        log(fl_ctx, f"round {round_} {site}: accepted={row['accepted']}, status={status}{detail}")
        self._write()
        return row

    def run_status(self, status: str, reason: str = "", **facts) -> None:
        """Write how the run ended: ``completed``, ``stopped_early``, ``ended_early`` or ``aborted``, and why."""
        if self.folder is not None:
            save_json(self.folder / f"{RUN_STATUS}.json", {"status": status, "reason": reason, **facts})

    def forget_rounds_from(self, round_: int) -> None:
        """Drop the rows of rounds ``round_`` and later: a resumed run does them again."""
        kept = [row for row in self.rows if row["round"] < round_]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._write()

    def _continue(self, resumed: Path) -> None:
        path = resumed if resumed.suffix == ".json" else resumed / f"{self.file_name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no contribution records to continue from (resume_from)")
        self.rows = list(load_json(path))
        self._write()

    def _write(self) -> None:
        if self.folder is None:
            return
        save_json(self.folder / f"{self.file_name}.json", self.rows)
        save_csv(self.folder / f"{self.file_name}.csv", self.rows, COLUMNS)
