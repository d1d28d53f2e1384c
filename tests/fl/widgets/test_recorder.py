"""The contribution records: one row per expected contribution, what it weighed, and an interrupted round replaced on resume."""

from __future__ import annotations

import json

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, FLMetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel

from fedfms.fl.widgets.recorder import COLUMNS, ContributionRecorder


def _started(folder, resume_from=None) -> tuple[ContributionRecorder, FLContext]:
    recorder, fl_ctx = ContributionRecorder(resume_from=resume_from), FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(folder), private=True, sticky=False)
    recorder.handle_event(EventType.START_RUN, fl_ctx)
    return recorder, fl_ctx


def test_rows_carry_the_weight_used_and_the_change_norm(tmp_path):
    recorder, fl_ctx = _started(tmp_path)
    update = FLModel(params={"w": [1.0, 2.0]}, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 72, "num_train_samples": 72})
    row = recorder.record(fl_ctx, 0, "site-1", "accepted", None, update, weight=72, change_norm=0.5)
    assert (row["weight"], row["change_norm"], row["num_train_samples"]) == (72, 0.5, 72)
    recorder.record(fl_ctx, 0, "site-2", "lost", "lost connection")
    assert [r["status"] for r in json.loads((tmp_path / "round_metrics.json").read_text())] == ["accepted", "lost"]
    assert (tmp_path / "round_metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    with pytest.raises(ValueError, match="unknown contribution status 'gone'"):
        recorder.record(fl_ctx, 0, "site-3", "gone")


def test_a_resumed_run_replaces_the_rows_of_the_round_it_was_stopped_in(tmp_path):
    earlier, fl_ctx = _started(tmp_path / "earlier")
    for round_, site in [(0, "site-1"), (0, "site-2"), (1, "site-1"), (1, "site-2"), (2, "site-1")]:  # stopped in round 2
        earlier.record(fl_ctx, round_, site, "accepted")
    resumed, _ = _started(tmp_path / "resumed", resume_from=str(tmp_path / "earlier"))
    resumed.forget_rounds_from(2)
    assert [(r["round"], r["site"]) for r in json.loads((tmp_path / "resumed/round_metrics.json").read_text())] == [
        (0, "site-1"), (0, "site-2"), (1, "site-1"), (1, "site-2")
    ]
