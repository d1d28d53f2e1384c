"""After the rounds: every site scores the final global model on its test split (and the unseen site, if any)."""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.model_controller import ModelController

from fedfms.bundle import TEST_METRICS
from fedfms.io import save_csv, save_json

TEST_SPLIT = "testing"
COLUMNS = ("site", *TEST_METRICS)


class FinalEvaluation(ModelController):
    """Sends the last global model with ``meta["split"] = "testing"`` to every client's validate task.

    Each site answers with its test-set scores (2D Dice and IoU per slice, 3D Dice per volume,
    written in full at the site); the server writes one row per site and the mean over sites to
    ``<app_server>/<file_name>.csv`` and ``.json``. With ``unseen_evaluator_id`` (a
    :class:`fedfms.fl.unseen.UnseenSiteEvaluator`) a leave-one-site-out job adds a row
    ``unseen:<SITE>`` for the site that never trained; it is not part of the average.
    """

    def __init__(
        self,
        persistor_id: str = "persistor",
        task_name: str = "validate",
        file_name: str = "final_test",
        unseen_evaluator_id: str = "",
        task_check_period: float = 0.5,
    ) -> None:
        super().__init__(persistor_id=persistor_id, task_check_period=task_check_period)
        self.task_name = task_name
        self.file_name = file_name
        self.unseen_evaluator_id = unseen_evaluator_id

    def run(self) -> None:
        learnable = self.persistor.final_model(self.fl_ctx)
        if learnable is None:
            self.warning("no global model was saved; nothing to evaluate")
            return
        model = FLModelUtils.from_model_learnable(learnable)
        model.meta = {"split": TEST_SPLIT}
        results = self.send_model_and_wait(task_name=self.task_name, data=model)
        rows = sorted(({"site": r.meta.get("client_name"), **(r.metrics or {})} for r in results), key=lambda r: str(r["site"]))
        rows.append({"site": "average", **{k: _mean([r.get(k) for r in rows]) for k in COLUMNS[1:]}})
        if self.unseen_evaluator_id:
            rows.append(self._unseen_row())
        self._write(rows)
        for row in rows:
            self.info(f"final test {row['site']}: " + ", ".join(f"{k} {row.get(k)}" for k in COLUMNS[1:]))

    def _unseen_row(self) -> dict:
        evaluator = self.get_component(self.unseen_evaluator_id)
        app_root = Path(self.fl_ctx.get_prop(FLContextKey.APP_ROOT))
        site = evaluator.site_name()
        self.info(f"scoring the final global model on the unseen site {site}")
        return {"site": f"unseen:{site}", **evaluator.evaluate(self.persistor.global_model_path(), app_root / "eval_unseen")}

    def _write(self, rows: list[dict]) -> None:
        folder = Path(self.fl_ctx.get_prop(FLContextKey.APP_ROOT))
        save_json(folder / f"{self.file_name}.json", rows)
        save_csv(folder / f"{self.file_name}.csv", rows, COLUMNS)


def _mean(values: list) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None
