"""Best-model selection that a resumed run continues instead of starting afresh."""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReturnCode
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector

from fedfms.fl.persistors.trainable import resume_folder
from fedfms.fl.report import BEST
from fedfms.io import load_json, save_json


class ResumableModelSelector(IntimeModelSelector):
    """NVFlare's ``IntimeModelSelector`` that writes its best score to ``best_model.json`` and can start from it.

    The selector keeps the best validation score in memory only, so a restarted server would take
    the first resumed round's model as the best even when an earlier one scored higher. With
    ``resume_from`` (the earlier run's server app folder, or its ``FL_global_model.pt``) it starts
    from the earlier best score; the persistor carries the earlier best model along.
    """

    def __init__(self, *args, resume_from: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_from = resume_from
        self.folder: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            self.folder = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
            if self.resume_from and (resume_folder(self.resume_from) / BEST).is_file():
                earlier = load_json(resume_folder(self.resume_from) / BEST)
                self.best_val_metric = earlier["metric"]
                self.log_info(fl_ctx, f"best global model so far: round {earlier['round']}, {self.key_metric} {earlier['metric']:.4f}")

    def _before_accept(self, fl_ctx: FLContext) -> bool:
        """A failed task's reply carries no scores (the recorder says why): skip it instead of logging a traceback."""
        shareable = fl_ctx.get_peer_context().get_prop(FLContextKey.SHAREABLE)
        if shareable is None or shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return False
        return super()._before_accept(fl_ctx)

    def consider_final(self, scores: dict[str, float], steps: dict[str, float], rounds: int) -> bool:
        """Whether the final global model beats the best of the rounds; ``best_model.json`` records its score either way.

        No round follows the last aggregation, so the rounds never score the final model: the
        final evaluation asks the sites for its validation score (``scores``, per site) and this
        weighs them as the rounds' scores are weighed (``steps``: each site's training samples).
        The final model counts as the one sent in round ``rounds`` (the completed rounds).
        """
        weights = {site: (steps.get(site, 1.0) if self.weigh_by_local_iter else 1.0) * self.aggregation_weights.get(site, 1.0) for site in scores}
        if not scores or not sum(weights.values()):
            return False
        raw = sum(scores[site] * weights[site] for site in scores) / sum(weights.values())
        score = -raw if self.negate_key_metric else raw
        better = score > self.best_val_metric
        if better:
            self.best_val_metric, self.best_raw_val_metric = score, raw
        if self.folder is not None:
            best = load_json(self.folder / BEST) if (self.folder / BEST).is_file() else {}
            best = {"round": rounds, "metric": float(score)} if better else best
            final = {"round": rounds, "metric": float(score), "sites": {site: float(v) for site, v in sorted(scores.items())}}
            save_json(self.folder / BEST, {**best, "final_model": final})
        return better

    def _before_aggregate(self, fl_ctx: FLContext) -> None:
        best = self.best_val_metric
        super()._before_aggregate(fl_ctx)
        if self.best_val_metric != best and self.folder is not None:
            save_json(self.folder / BEST, {"round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND), "metric": float(self.best_val_metric)})
