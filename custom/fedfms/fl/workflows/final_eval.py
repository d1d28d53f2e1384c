"""After the rounds: every site scores the final global model on its test split (the unseen site of a leave-one-site-out job too)."""

from __future__ import annotations

import math
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.model_controller import ModelController

from fedfms.bundle import TEST_METRICS
from fedfms.data.partition import UNSEEN
from fedfms.fl.exchange import RUN_ID
from fedfms.fl.checks.liveness import SiteWatch, WatchedTasks
from fedfms.fl.persistors.trainable import BEST_MODEL, COMPLETED_ROUNDS
from fedfms.fl.widgets.recorder import ContributionRecorder
from fedfms.fl.workflows.fedavg import KEY_METRIC
from fedfms.fl.widgets.selector import ResumableModelSelector
from fedfms.io import save_csv, save_json

TEST_SPLIT = "testing"
COLUMNS = ("site", *TEST_METRICS, "note")
FEDBN_NOTE = "the global model as saved: its normalisation layers as they started (FedBN keeps the trained ones at the sites)"
PERSONALISED = "personalised"  # row-name prefix, and the learner's metric prefix (with "_")


class FinalEvaluation(WatchedTasks, ModelController):
    """Sends the last global model with ``meta["split"] = "testing"`` to every client's validate task.

    Each site answers with its test-set scores, ``TEST_METRICS`` (written in full at the site,
    see :mod:`fedfms.evaluation.report`): 2D Dice and IoU per slice and 3D Dice per volume under
    the empty-slice rule (an empty label scores 1 if nothing is predicted, else 0), 2D Dice over
    slices with organ only (``dice_2d_fg``), the share of empty slices with predicted foreground
    (``fp_rate_empty``) and HD95 per volume in pixels of the prepared label grid (``hd95_3d``).
    The server writes one row per site and the mean over the sites that answered to
    ``<app_server>/<file_name>.csv`` and ``.json``. A metric a site could not define (NaN there:
    no empty test slice, no volume with an HD95) is written as null / an empty cell, and the
    average of each metric is over the sites where it is defined. A site that fails or does
    not answer within ``task_timeout`` seconds (or ``wait_time_after_min_received`` seconds after
    the first answer) gets a row saying so; the others' scores are kept. A site the rounds
    recorded ``lost`` (its last contribution row) is not sent the task, and one whose job process
    stops answering during the evaluation is not waited for (:class:`~fedfms.fl.checks.liveness.SiteWatch`).
    Under FedBN (``norm_statistics: local`` in the persistor) the site rows score the global model
    as saved (normalisation layers as they started, said in the note). Where sites keep a
    personalised model (Ditto's personal model; under FedBN, the global weights with the site's
    own normalisation layers) they score it too: rows ``personalised:<site>`` and
    ``personalised:average`` follow the global ones. The ``evaluate_only_sites`` of a
    leave-one-site-out job (hospitals that never trained) score the model on their own data like
    the others; their rows are named ``unseen:<SITE>`` and are not part of the average.

    The training sites also send the final model's validation Dice: no round follows the last
    aggregation, so the rounds never scored that model. The model selector (``selector_id``)
    weighs these scores as it weighs the rounds' and, when the final model beats the best of the
    rounds, the persistor's best model becomes a copy of it; ``best_model.json`` records the final
    model's score either way (``final_model``).
    """

    def __init__(
        self,
        persistor_id: str = "persistor",
        task_name: str = "validate",
        file_name: str = "final_test",
        evaluate_only_sites: list[str] | None = None,
        task_timeout: int = 0,
        task_check_period: float = 0.5,
        wait_time_after_min_received: int = 60,
        recorder_id: str = "contributions",
        selector_id: str = "model_selector",
        liveness_interval: float = 10.0,
        liveness_timeout: float = 10.0,
        liveness_misses: int = 2,
    ) -> None:
        super().__init__(persistor_id=persistor_id, task_check_period=task_check_period, ignore_result_error=True)
        if task_timeout < 0 or wait_time_after_min_received < 0:
            raise ValueError(f"task_timeout and wait_time_after_min_received must be >= 0, got {task_timeout} and {wait_time_after_min_received}")
        self.task_name = task_name
        self.file_name = file_name
        self.evaluate_only_sites = sorted(evaluate_only_sites or [])
        self.task_timeout = int(task_timeout)
        self.wait_time_after_min_received = int(wait_time_after_min_received)
        self.recorder_id = recorder_id
        self.selector_id = selector_id
        self.watch = SiteWatch(liveness_interval, liveness_timeout, liveness_misses)
        self._holders: set[str] = set()

    def run(self) -> None:
        learnable = self.persistor.final_model(self.fl_ctx)
        if learnable is None:
            self.warning("no global model was saved; nothing to evaluate")
            return
        model = FLModelUtils.from_model_learnable(learnable)
        rounds = int((model.meta or {}).get(COMPLETED_ROUNDS) or 0)
        model.meta = {"split": TEST_SPLIT, RUN_ID: (model.meta or {}).get(RUN_ID)}  # the run id: where sites keep their personal models
        connected = sorted(client.name for client in self.engine.get_clients())
        sites = [s for s in connected if s not in self.evaluate_only_sites]
        self.watch.lost.update(self._lost_in_rounds())
        results = self._collect([s for s in connected if s not in self.watch.lost], model)
        note = FEDBN_NOTE if getattr(self.persistor, "norm_statistics", "global") == "local" else None
        answered = {r.meta.get("client_name"): r for r in results if r.metrics}
        scored = {site: {**_nan_as_none(_own(r.metrics)), "note": note} for site, r in answered.items()}
        if not scored:
            self.error("no site scored the final global model (each failed, was lost or did not answer in time): no final test table")
            return
        rows = _with_average([{"site": s, **scored.get(s, {"note": self._no_scores(s)})} for s in sites], "average", set(scored), len(sites))
        personalised = {site: {**_nan_as_none(_own(r.metrics, PERSONALISED + "_")), "note": r.meta.get(PERSONALISED)}
                        for site, r in answered.items() if site in sites and _own(r.metrics, PERSONALISED + "_")}
        if personalised:
            own = [{"site": f"{PERSONALISED}:{s}", **personalised[s]} for s in sites if s in personalised]
            rows += _with_average(own, f"{PERSONALISED}:average", {r["site"] for r in own}, len(sites))
        rows += [self._unseen_row(site, scored, connected) for site in self.evaluate_only_sites]
        self._write(rows)
        self._keep_final_if_best({s: r.metrics for s, r in answered.items() if s in sites}, rounds)
        for row in rows:
            self.info(f"final test {row['site']}: " + ", ".join(f"{k} {row.get(k)}" for k in TEST_METRICS) + (f" ({row['note']})" if row.get("note") else ""))

    def _collect(self, targets: list[str], model) -> list:
        """The sites' answers; without a timeout every site is waited for (min_responses 0 means all of them)."""
        results = []
        if not targets:
            return results
        self.broadcast_model(
            data=model, task_name=self.task_name, targets=targets, min_responses=1 if self.task_timeout else 0,
            timeout=self.task_timeout, wait_time_after_min_received=self.wait_time_after_min_received if self.task_timeout else 0,
            blocking=False, callback=results.append,
        )
        answered = lambda: {r.meta.get("client_name") for r in results}  # noqa: E731
        self.wait_watched(targets, answered, lambda site, why: self.warning(f"{site} is lost: {why}"))
        return results

    def _keep_final_if_best(self, metrics: dict[str, dict], rounds: int) -> None:
        """The final model's validation scores (sent with the test scores) to the model selector; the best model file follows it."""
        scores = {site: float(m[KEY_METRIC]) for site, m in metrics.items() if math.isfinite(float(m.get(KEY_METRIC, math.nan)))}
        if scores:
            self.info("validation Dice of the final global model: " + ", ".join(f"{site} {v:.4f}" for site, v in sorted(scores.items())))
        selector = self.engine.get_component(self.selector_id)
        if not scores or not isinstance(selector, ResumableModelSelector):
            return
        steps = {row["site"]: row["num_train_samples"] or 1.0 for row in self._recorder_rows() if row["accepted"]}
        if selector.consider_final(scores, steps, rounds):
            self.persistor.keep_final_as_best()
            self.info(f"the final global model is the best one: {BEST_MODEL} is now a copy of it")

    def _recorder_rows(self) -> list[dict]:
        recorder = self.engine.get_component(self.recorder_id)
        return recorder.rows if isinstance(recorder, ContributionRecorder) else []

    def _lost_in_rounds(self) -> dict[str, str]:
        """Sites whose last contribution row says ``lost`` (the rounds' recorder, if the job has one)."""
        last = {row["site"]: row for row in self._recorder_rows()}
        return {site: f"lost in round {row['round']}: {row['reason']}" for site, row in last.items() if row["status"] == "lost"}

    def _no_scores(self, site: str) -> str:
        if site in self.watch.lost:
            return f"no scores: {self.watch.lost[site]}"
        if self.task_timeout:
            return (
                f"no scores: the site failed, or did not answer within {self.wait_time_after_min_received} s of the first answer "
                f"(wait_time_after_min_received; task timeout {self.task_timeout} s)"
            )
        return "no scores: the site failed"

    def _unseen_row(self, site: str, scored: dict, connected: list[str]) -> dict:
        """The row of a site that never trained; not part of the average."""
        if site in scored:
            note = "; ".join(filter(None, ["never trained: scored on its own test data", scored[site]["note"]]))
            return {"site": f"{UNSEEN}:{site}", **scored[site], "note": note}
        why = "not connected" if site not in connected else f"failed or did not answer within {self.task_timeout} s"
        return {"site": f"{UNSEEN}:{site}", "note": f"no scores: the site {why}"}

    def _write(self, rows: list[dict]) -> None:
        folder = Path(self.fl_ctx.get_prop(FLContextKey.APP_ROOT))
        save_json(folder / f"{self.file_name}.json", rows)
        save_csv(folder / f"{self.file_name}.csv", rows, COLUMNS)


def _own(metrics: dict, prefix: str = "") -> dict:
    """The test metrics under ``prefix`` (none: the global model's), without it."""
    return {k: metrics[prefix + k] for k in TEST_METRICS if prefix + k in metrics}


def _with_average(rows: list[dict], name: str, scored: set[str], expected: int) -> list[dict]:
    """``rows`` and their average row over those whose site is in ``scored``."""
    trained = [r for r in rows if r["site"] in scored]
    return rows + [{"site": name, **{k: _mean([r.get(k) for r in trained]) for k in TEST_METRICS}, "note": f"{len(trained)} of {expected} sites"}]


def _nan_as_none(metrics: dict) -> dict:
    """A site's scores with NaN (a metric undefined at that site) as None: JSON has no NaN, and None reads "-"."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def _mean(values: list) -> float | None:
    """Mean of the defined numbers among ``values`` (None, NaN and non-numbers are skipped); None if there are none."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
    return sum(numbers) / len(numbers) if numbers else None
