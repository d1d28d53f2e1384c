"""Server-side record of every client contribution: round, site, metrics, weight, bytes.

Written after each contribution to ``<app_server>/round_metrics.csv`` and ``.json``, so a run can
be judged by what was received and accepted, not by the simulator's exit code (NVFlare can reject
every update and still exit 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedfms.io import save_csv, save_json

COLUMNS = ("round", "site", "data", "accepted", "num_train_samples", "bytes_received", "global_val_dice", "local_val_dice")


def payload_bytes(params: dict) -> int:
    """Bytes of a parameter dict as sent (tensors or arrays at their own dtype)."""
    total = 0
    for value in (params or {}).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        else:
            total += np.asarray(value).nbytes
    return total


class ContributionRecorder(FLComponent):
    """Appends one row per received client result; ``file_name`` is relative to the server app folder."""

    def __init__(self, file_name: str = "round_metrics") -> None:
        super().__init__()
        self.file_name = file_name
        self.rows: list[dict] = []
        self.folder: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.folder = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            self._record(fl_ctx)

    def _record(self, fl_ctx: FLContext) -> None:
        shareable = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        if shareable is None:
            return
        model = FLModelUtils.from_shareable(shareable)
        if not model.params:
            return  # evaluation-only answers (final test) carry no parameters
        metrics, meta = model.metrics or {}, model.meta or {}
        row = {
            "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
            "site": _client_name(fl_ctx, meta),
            "data": meta.get("datalist"),
            "accepted": bool(fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED)),
            "num_train_samples": meta.get("num_train_samples"),
            "bytes_received": payload_bytes(model.params),
            "global_val_dice": metrics.get("val_mean_dice"),  # the received global model, scored before training
            "local_val_dice": meta.get("local_val_dice"),
        }
        self.rows.append(row)
        self.log_info(fl_ctx, f"round {row['round']} {row['site']}: accepted={row['accepted']}, {row['bytes_received']:,} bytes")
        self._write()

    def _write(self) -> None:
        if self.folder is None:
            return
        save_json(self.folder / f"{self.file_name}.json", self.rows)
        save_csv(self.folder / f"{self.file_name}.csv", self.rows, COLUMNS)


def _client_name(fl_ctx: FLContext, meta: dict) -> str | None:
    peer = fl_ctx.get_peer_context()
    return peer.get_identity_name() if peer else meta.get("client_name")
