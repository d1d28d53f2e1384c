"""FedAvg that checks every update, bounds every round in time, records every contribution, and resumes.

NVFlare's ``FedAvg`` waits for every sampled site forever, adds any result it gets (a failed one
aborts the run) and keeps no record of what it refused. :class:`ResumableFedAvg` keeps FedAvg's
machinery (its weighted aggregation or a configured ``ModelAggregator``, the persistor,
the events the model selector and TensorBoard receiver listen to) and changes the round loop:

* each round's task has ``task_timeout`` seconds; once ``min_clients`` sites have answered, the
  others get ``wait_time_after_min_received`` more seconds (as NVFlare's ``ScatterAndGather``),
  and a site that answers later is recorded ``late``;
* a site that holds the task and whose job process stops answering the server
  (:class:`~fedfms.fl.checks.liveness.SiteWatch`) is recorded ``lost`` at once and is not waited for;
  it gets no task in later rounds until it answers again;
* every update goes through the :class:`~fedfms.fl.checks.updates.UpdateValidator` as it arrives,
  so a bad one is refused whole, whatever the order of arrival; when the round's task ends, the
  updates that passed are compared with each other (change norm against the median of the
  others') and, with ``clip_change_norm``, each change is scaled down to that norm; weight changes
  (sites that send ``WEIGHT_DIFF``) become weights (global model + change) for an aggregator that
  averages weights (``needs_full_params``, e.g. LoRA-SVD);
* the accepted updates are added when the round's task ends, in the order of the site names, so
  the global model does not depend on the order the sites answered in (the simulator's thread
  count, the sites' speeds): floating-point sums depend on their order;
* a site whose task fails is recorded with the site's own error message and the round goes on without it;
* a round with fewer than ``min_clients`` acceptable updates leaves the global model as it was
  and ends the rounds, so the workflows after FedAvg (final evaluation) still run on the last
  good global model;
* every expected contribution and the run's end state go to the
  :class:`~fedfms.fl.widgets.recorder.ContributionRecorder`.

With ``patience`` it stops early: when the mean validation Dice of the global model (the
sample-weighted mean of the scores the sites give the model they receive, before training) has
not improved for ``patience`` rounds, the rounds end, ``run_status`` says ``stopped_early`` and
why, and the final evaluation follows; the best global model is kept by the model selector.
NVFlare's own ``patience`` needs a ``stop_cond`` target and saves only improved models, which a
resumed run could not continue from.

It also resumes: when the persistor starts from a saved global model, the rounds continue after
the ones that model records, with the server's state saved in that model's meta
(:meth:`ResumableFedAvg.server_state`: the update checks' memory, the early-stopping count, the
run's id, and what an algorithm adds, such as FedOpt's optimiser or SCAFFOLD's control variates),
and the records of an interrupted round replaced by the new ones. The sites keep their own state
(SCAFFOLD's local controls, Ditto's personal model, FedBN's normalisation layers) under the run's
id (:data:`RUN_ID`, sent with every task), so a resumed run finds it again.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReturnCode, Shareable
from nvflare.apis.client import Client
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fedprox_utils import set_fedprox_metadata
from nvflare.app_common.workflows.base_fedavg import _get_client_name
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.log_utils import center_message

from fedfms.fl.exchange import RUN_ID
from fedfms.fl.executors.reporting import site_error
from fedfms.fl.filters.wire import wire_bytes
from fedfms.fl.checks.liveness import SiteWatch, WatchedTasks
from fedfms.fl.persistors.trainable import COMPLETED_ROUNDS
from fedfms.fl.widgets.recorder import ContributionRecorder
from fedfms.fl.checks.updates import UpdateValidator

#: Keys of the saved global model's meta: the update checks' memory and the early-stopping count, restored on resume.
VALIDATOR_STATE = "update_validator_state"
EARLY_STOPPING_STATE = "early_stopping_state"
#: The score early stopping and the model selector follow: the sites' validation Dice of the model they received.
KEY_METRIC = "val_mean_dice"


def _like(reference, value):
    """``value`` as a NumPy array when ``reference`` is one (torch tensors otherwise stay as they are)."""
    if isinstance(reference, np.ndarray) and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().astype(reference.dtype, copy=False)
    return value


def start_of(model: FLModel) -> int:
    """The first round of this run (a resumed run starts after the rounds its model records)."""
    return model.start_round or 0


class ResumableFedAvg(WatchedTasks, FedAvg):
    """NVFlare's FedAvg with checked updates, bounded rounds, full records and resume (see the module docstring).

    Args:
        min_clients: acceptable updates a round needs to update the global model (the job's
            ``meta.json`` ``min_clients``); fewer end the rounds.
        task_timeout: seconds a round's task may take (0: no limit; then a silent site stalls the run).
        wait_time_after_min_received: seconds the other sites get once ``min_clients`` have answered:
            what a silent (hung) site costs per round. A site slower than the others by more than
            this is recorded ``late`` and left out of the round, so give heterogeneous sites room.
        clip_change_norm: scale each accepted update's change against the global model down to at
            most this L2 norm (None: no clipping); the row records the clipping.
        liveness_interval, liveness_timeout, liveness_misses: how :class:`~fedfms.fl.checks.liveness.SiteWatch`
            probes sites that hold the task but have not answered (interval 0: never).
        validator_id: the :class:`~fedfms.fl.checks.updates.UpdateValidator` component.
        recorder_id: the :class:`~fedfms.fl.widgets.recorder.ContributionRecorder` component.
        evaluate_only_sites: sites that never get a training task (the unseen hospital of a
            leave-one-site-out job, which only scores the final model in ``FinalEvaluation``).
        patience: end the rounds once the mean validation Dice of the global model has not improved
            for this many rounds (None: run every round).
        kwargs: ``FedAvg`` arguments (``num_rounds``, ``persistor_id``, ``aggregator``, ...).
            ``ignore_result_error`` defaults to True: a failed site is recorded, not a reason to abort.
    """

    def __init__(
        self,
        *args,
        min_clients: int = 1,
        task_timeout: int = 0,
        validator_id: str = "update_validator",
        recorder_id: str = "contributions",
        evaluate_only_sites: list[str] | None = None,
        wait_time_after_min_received: int = 60,
        clip_change_norm: float | None = None,
        liveness_interval: float = 10.0,
        liveness_timeout: float = 10.0,
        liveness_misses: int = 2,
        patience: int | None = None,
        **kwargs,
    ) -> None:
        if kwargs.get("stop_cond"):
            raise ValueError("ResumableFedAvg stops early by patience on the validation Dice; NVFlare's stop_cond is not supported")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be a whole number of rounds >= 1, got {patience!r}")
        kwargs.setdefault("ignore_result_error", True)
        super().__init__(*args, **kwargs)
        fobs.register(TensorDecomposer)  # sites' updates arrive as torch tensors, from the first one on
        if min_clients < 1 or task_timeout < 0 or wait_time_after_min_received < 0:
            raise ValueError(
                f"need min_clients >= 1, task_timeout >= 0 and wait_time_after_min_received >= 0, "
                f"got {min_clients}, {task_timeout} and {wait_time_after_min_received}"
            )
        if clip_change_norm is not None and not clip_change_norm > 0:
            raise ValueError(f"clip_change_norm must be positive, got {clip_change_norm}")
        self.min_clients = min_clients
        self.task_timeout = int(task_timeout)
        self.wait_time_after_min_received = int(wait_time_after_min_received)
        self.clip_change_norm = clip_change_norm
        self.watch = SiteWatch(liveness_interval, liveness_timeout, liveness_misses)
        self.validator_id = validator_id
        self.recorder_id = recorder_id
        self.evaluate_only_sites = sorted(evaluate_only_sites or [])
        self.validator: UpdateValidator | None = None
        self.recorder: ContributionRecorder | None = None
        self._outcomes: dict[str, str] = {}  # this round: site -> status
        self._passed: dict[str, FLModel] = {}  # this round: site -> its update, passed the checks on arrival
        self._accepted: dict[str, FLModel] = {}  # this round: site -> its checked update, not yet added
        self._holders: set[str] = set()  # this round: sites that were handed the task
        self.patience = patience
        self.best_score: tuple[int, float] | None = None  # (round whose received model scored it, mean validation Dice)
        self.rounds_without_improvement = 0
        self.run_id: str | None = None

    #: Algorithms that step on the mean change of the exchanged tensors set their name here: they cannot follow an
    #: aggregator that re-factorises the averaged weights (LoRA-SVD picks a new basis for the factors every round).
    needs_mean_change: str | None = None

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        self.validator = self._component(self.validator_id, UpdateValidator)
        self.recorder = self._component(self.recorder_id, ContributionRecorder)
        if self.needs_mean_change and getattr(self.aggregator, "needs_full_params", False):
            raise ValueError(f"{self.needs_mean_change} cannot follow {type(self.aggregator).__name__}: it re-factorises the averaged weights, "
                             "so the factors change basis every round; use fedavg, fedprox or ditto")

    def _component(self, component_id: str, kind: type):
        component = self.engine.get_component(component_id)
        if not isinstance(component, kind):
            raise TypeError(f"component {component_id!r} must be a {kind.__name__}, got {type(component).__name__}")
        return component

    def run(self) -> None:
        model = self.load_model()
        completed = int((model.meta or {}).get(COMPLETED_ROUNDS, 0))
        total = self.start_round + self.num_rounds
        if completed >= total:
            self.info(f"the starting model already completed {completed} of {total} rounds; no rounds left")
            self.recorder.run_status("completed", f"{completed} of {total} rounds were done before this run")
            return
        if completed:
            self.info(f"resuming at round {completed}: {total - completed} of {total} rounds left")
        self.restore_server_state(model.meta or {})
        self.recorder.forget_rounds_from(completed)  # an interrupted round's rows: its contributions come again
        start = max(self.start_round, completed)
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, total, private=True, sticky=False)
        model.start_round, model.total_rounds = start, total
        self.info(center_message("Start FedAvg."))
        for self.current_round in range(start, total):
            if not self._round(model):
                return
            score = self._mean_score()
            model = self._aggregated(model)
            model.meta = {**(model.meta or {}), **self.server_state()}
            self.save_model(model)
            self._maybe_cleanup_memory()
            stop = self._no_improvement(score)
            if stop:
                self.info(f"early stop: {stop}")
                self.recorder.run_status("stopped_early", stop, rounds_completed=self.current_round + 1, rounds_planned=total)
                self.info(center_message("Finished FedAvg."))
                return
        self.recorder.run_status("completed", f"all {total} rounds", rounds_completed=total, rounds_planned=total)
        self.info(center_message("Finished FedAvg."))

    def server_state(self) -> dict:
        """What a restarted server needs to go on as if it had not stopped, saved in the global model's meta."""
        best = {"round": self.best_score[0], "score": self.best_score[1]} if self.best_score else None
        return {
            VALIDATOR_STATE: self.validator.state(),
            EARLY_STOPPING_STATE: {"best": best, "rounds_without_improvement": self.rounds_without_improvement},
            RUN_ID: self.run_id,
        }

    def restore_server_state(self, meta: dict) -> None:
        """Continue from :meth:`server_state` as saved in the starting model's meta (a fresh run finds none)."""
        self.validator.restore(meta.get(VALIDATOR_STATE))
        stopping = meta.get(EARLY_STOPPING_STATE) or {}
        best = stopping.get("best")
        self.best_score = (int(best["round"]), float(best["score"])) if best else None
        self.rounds_without_improvement = int(stopping.get("rounds_without_improvement", 0))
        # The job id alone repeats (the simulator's is always simulate_job): the start time makes a new run's state its own.
        self.run_id = meta.get(RUN_ID) or f"{self.fl_ctx.get_job_id()}_{time.strftime('%Y%m%d-%H%M%S')}"
        self.info(f"run id {self.run_id}: sites keep their own state of this run under it")

    def task_meta(self) -> dict:
        """What the round's task tells the sites beside the weights (an algorithm adds its own)."""
        return {RUN_ID: self.run_id}

    def _task_model(self, model: FLModel) -> FLModel:
        """The global model as sent: the weights and :meth:`task_meta`, not the server's own state."""
        task = FLModel(params=model.params, params_type=model.params_type, current_round=model.current_round,
                       start_round=model.start_round, total_rounds=model.total_rounds, meta=self.task_meta())
        set_fedprox_metadata(task, self.fedprox_mu)
        return task

    def _mean_score(self) -> float | None:
        """The sample-weighted mean validation Dice the accepted sites gave the model they received this round."""
        scored = [(float(m.metrics[KEY_METRIC]), float(m.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND])) for m in self._accepted.values()
                  if KEY_METRIC in (m.metrics or {}) and np.isfinite(m.metrics[KEY_METRIC])]
        total = sum(weight for _, weight in scored)
        return sum(score * weight for score, weight in scored) / total if total else None

    def _no_improvement(self, score: float | None) -> str | None:
        """Why the rounds end here (patience exhausted), or None to go on."""
        if self.patience is None or score is None:
            return None
        if self.best_score is None or score > self.best_score[1]:
            self.best_score, self.rounds_without_improvement = (self.current_round, score), 0
            return None
        self.rounds_without_improvement += 1
        self.info(f"round {self.current_round}: mean validation Dice {score:.4f}, no improvement for {self.rounds_without_improvement} of {self.patience} rounds")
        if self.rounds_without_improvement < self.patience:
            return None
        return (
            f"the mean validation Dice of the global model has not improved on {self.best_score[1]:.4f} (the model sent in round "
            f"{self.best_score[0]}) for {self.patience} rounds (patience); {self.current_round + 1} of {self.start_round + self.num_rounds} rounds ran"
        )

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        """The connected sites that train (``num_clients`` of them at random, if set); evaluate-only and lost sites do not."""
        for site in self.watch.returned(self.engine, self.fl_ctx):
            self.info(f"{site} answers again: it is sampled from round {self.current_round} on")
        training = [c.name for c in self.engine.get_clients() if c.name not in self.evaluate_only_sites and c.name not in self.watch.lost]
        if num_clients and num_clients < len(training):
            training = random.sample(training, num_clients)
        left_out = [f"evaluate only: {self.evaluate_only_sites}"] if self.evaluate_only_sites else []
        left_out += [f"lost: {sorted(self.watch.lost)}"] if self.watch.lost else []
        self.info(f"round {self.current_round} trains on {training}" + "".join(f"; {item}" for item in left_out))
        return training

    def _round(self, model: FLModel) -> bool:
        """Send the round's task and collect its updates; False when the rounds must end here."""
        self.info(center_message(message=f"Round {self.current_round} started.", boarder_str="-"))
        model.current_round = self.current_round
        self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, self.current_round, private=True, sticky=False)
        if self.aggregator and self.aggregator.fl_ctx:
            self.aggregator.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, self.current_round, private=True, sticky=False)
        self.event(AppEventType.ROUND_STARTED)
        clients = self.sample_clients(self.num_clients)
        self._reset_aggregation(len(clients))
        self.validator.expect(model.params, self.persistor.model.state_dict() if self.persistor else model.params)
        if clients:
            self.broadcast_model(
                data=self._task_model(model),
                task_name=self.task_name,
                targets=clients,
                min_responses=min(self.min_clients, len(clients)) if self.task_timeout else 0,  # 0: wait for every site
                timeout=self.task_timeout,
                wait_time_after_min_received=self.wait_time_after_min_received if self.task_timeout else 0,
                blocking=False,
                callback=self._aggregate_one_result,
            )
        if not self.wait_watched(clients, lambda: set(self._outcomes), lambda site, why: self._record(site, "lost", why)):
            self.info("Abort signal triggered. Finishing FedAvg.")
            return False
        answered = sum(status != "lost" for status in self._outcomes.values())
        for site in sorted(set(clients) - set(self._outcomes)):
            self._record(site, "timed_out", self._silence(answered))
        self._settle()
        if len(self._accepted) < self.min_clients:
            kept = f"as it was after round {self.current_round - 1}" if self.current_round > start_of(model) else "the initial model"
            reason = (
                f"round {self.current_round}: {len(self._accepted)} acceptable updates of {len(clients)} sites, fewer than "
                f"min_clients {self.min_clients}; the global model stays {kept}"
            )
            self.error(f"the rounds end early: {reason}")
            self.recorder.run_status("ended_early", reason, rounds_completed=self.current_round, rounds_planned=model.total_rounds)
            return False
        return True

    def _silence(self, answered: int) -> str:
        """Why a site that held the task is recorded ``timed_out``."""
        if self.task_timeout and answered >= self.min_clients:
            sites = f"{answered} site" + ("s" if answered != 1 else "")
            return f"no answer within {self.wait_time_after_min_received} s after {sites} had answered (wait_time_after_min_received)"
        return f"no answer within the task timeout of {self.task_timeout} s"

    def _settle(self) -> None:
        """The round's updates that passed on arrival: compared with each other, clipped if asked, then accepted."""
        norms = {site: self.validator.round_norms[site] for site in self._passed}
        for site, reason in sorted(self.validator.check_round(norms).items()):
            self._record(site, "rejected", reason, self._passed.pop(site))
        for site in sorted(self._passed):
            update, note = self._clipped(self._passed.pop(site), norms[site])
            self._accepted[site] = self._as_weights(update) if getattr(self.aggregator, "needs_full_params", False) else update
            self.validator.remember(site, update)
            weight = (update.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND) if getattr(self.aggregator, "weighted", True) else None
            self._record(site, "accepted", note, update, change_norm=norms[site], weight=weight)

    def _clipped(self, update: FLModel, norm: float) -> tuple[FLModel, str | None]:
        """The update with its change scaled down to ``clip_change_norm`` (and a note), or as it is."""
        if self.clip_change_norm is None or norm <= self.clip_change_norm:
            return update, None
        scale, reference = self.clip_change_norm / norm, self.validator.reference
        for key, value in update.params.items():
            value = torch.as_tensor(value)
            if key in reference and value.is_floating_point():
                base = torch.zeros_like(value) if update.params_type == ParamsType.DIFF else reference[key].to(value.dtype)
                update.params[key] = base + (value - base) * scale
        return update, f"change clipped from norm {norm:.4g} to {self.clip_change_norm:g} (clip_change_norm)"

    def _as_weights(self, update: FLModel) -> FLModel:
        """A weight change as the weights it makes (the round's global model plus the change), for aggregators that average weights."""
        if update.params_type != ParamsType.DIFF:
            return update
        reference = self.validator.reference
        params = {}
        for key, value in update.params.items():
            value = torch.as_tensor(value)
            params[key] = reference[key].to(value.dtype) + value if key in reference and value.is_floating_point() else value
        return FLModel(params=params, params_type=ParamsType.FULL, meta=update.meta, metrics=update.metrics)

    def _aggregated(self, model: FLModel) -> FLModel:
        for site in sorted(self._accepted):  # FedAvg's own aggregation (or the configured aggregator), in a fixed order
            super()._aggregate_one_result(self._accepted.pop(site))
        self.event(AppEventType.BEFORE_AGGREGATION)
        aggregate_results = self._get_aggregated_result()
        self.fire_event_with_data(AppEventType.AFTER_AGGREGATION, self.fl_ctx, AppConstants.AGGREGATION_RESULT, aggregate_results)
        return self.update_model(model, aggregate_results)

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        """FedAvg's update, with the aggregate in the global model's array type.

        The persistor hands out NumPy arrays while sites send torch tensors; FedAvg replaces weights
        but adds weight changes, and NumPy 2 cannot add a torch tensor to an array.
        """
        if aggr_result.params_type == ParamsType.DIFF:
            aggr_result.params = {k: _like(model.params.get(k), v) for k, v in aggr_result.params.items()}
        return super().update_model(model, aggr_result)

    def _reset_aggregation(self, expected: int) -> None:
        """A new round's aggregation state, as FedAvg's own loop sets it."""
        if self.aggregator:
            self.aggregator.reset_stats()
        else:
            self._aggr_helper = WeightedAggregationHelper(exclude_vars=self.exclude_vars)
            self._aggr_metrics_helper = WeightedAggregationHelper()
            self._all_metrics = True
        self._received_count, self._expected_count = 0, expected
        self._params_type, self._site_metric_weights = None, {}
        self._outcomes, self._passed, self._accepted, self._holders = {}, {}, {}, set()
        self._wire: dict[str, tuple[int | None, int | None]] = {}  # site -> payload bytes (down, up) its filters measured

    def _aggregate_one_result(self, result: FLModel) -> bool:
        """Check the update as it arrives; one that passes waits for the round's end (:meth:`_settle`)."""
        site = _get_client_name(result)
        reason = self.validator.check(site, result) if result.params else "the update holds no parameters"
        if reason:
            self._record(site, "rejected", reason, result)
            return False
        self._passed[site] = result
        self._outcomes[site] = "passed"
        return True

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext, is_unknown_task: bool = False) -> bool:
        self._wire[client_name] = wire_bytes(result)  # read before FedAvg turns the reply into an FLModel
        accepted = super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK and not is_unknown_task:
            self._record(client_name, "failed", f"the site's task ended with {rc}: {site_error(result) or 'no message from the site'}")
        return accepted

    def process_result_of_unknown_task(self, client: Client, task_name: str, client_task_id: str, result: Shareable, fl_ctx: FLContext) -> None:
        """A result that came after its round ended: recorded, never aggregated."""
        contribution_round = result.get_cookie(AppConstants.CONTRIBUTION_ROUND, result.get_header(AppConstants.CURRENT_ROUND))
        self.recorder.record(fl_ctx, contribution_round, client.name, "late", f"answered after round {contribution_round} had ended; not aggregated")

    def _record(self, site: str, status: str, reason: str | None, result: FLModel | None = None, **facts) -> None:
        self._outcomes[site] = status
        down, up = self._wire.get(site, (None, None))
        self.recorder.record(self.fl_ctx, self.current_round, site, status, reason, result, wire_bytes_down=down, wire_bytes_up=up, **facts)
