"""The federated client: a MONAI bundle's training workflow behind NVFlare's ModelLearner API.

Each round the site receives the global values of the strategy's trainable parameters, loads
them into the bundle's network (its frozen weights never leave the site and never arrive), scores
the received global model on its validation split (:meth:`BundleLearner.validate`, which NVFlare's
ModelLearnerExecutor calls before training), trains ``local_epochs`` with the bundle's own
trainer (loss, optimiser, handlers and its per-epoch validation), and sends back only the trainable
parameters, weighted by its number of training samples. Train loss and validation Dice are
streamed to the server's TensorBoard through NVFlare's tracking API (a ``TBWriter`` component).

A round's local training depends only on the global model, the site's data, the round and the
seed: it starts with a fresh optimiser state and random streams seeded from (seed, datalist,
round). A site's process may therefore be a new one every round, as the NVFlare simulator makes it
when it runs fewer client processes than sites (``-t`` below ``-n``) or as a restarted hospital
process is, and the federation still computes the same model. What a site must carry from round
to round (SCAFFOLD's controls, Ditto's personal model, FedBN's normalisation layers) it keeps in
files under the run's id (:class:`~fedfms.fl.executors.algorithms.SiteState`).

The federated algorithm is the server's choice, told with each task (:mod:`fedfms.fl.executors.algorithms`):
FedProx adds its proximal term to the bundle's loss, SCAFFOLD corrects every local step and sends
the change of the site's controls; Ditto (``ditto_lambda``) also trains a personal model of the
site's own. The final evaluation scores the global model and, for Ditto and FedBN, the site's
personalised one (global weights with the site's own normalisation layers).
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow
from monai.data.utils import set_rnd
from monai.utils import set_determinism
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model_learner import ModelLearner
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from fedfms.bundle import bundle_dir, bundle_network, bundle_workflow, check_datalist, evaluate_checkpoint
from fedfms.data.partition import UNSEEN, client_datalists, unseen_site
from fedfms.errors import DataError
from fedfms.fl.exchange import RUN_ID, exchanged_keys, local_keys
from fedfms.fl.executors.algorithms import ScaffoldSteps, SiteState, proximal_training
from fedfms.fl.site_settings import HINT, MEMORY_KEYS, SiteSettings, read_site_settings
from fedfms.paths import resolve_path

#: Names of a site's state files (:class:`SiteState`) and the prefix of its personalised test scores.
PERSONAL_MODEL, SCAFFOLD_CONTROLS, LOCAL_LAYERS = "ditto_personal_model", "scaffold_local_controls", "fedbn_local_layers"
PERSONALISED = "personalised_"


def site_datalist(site: str, datalist_dir: str | os.PathLike) -> str:
    """The datalist a federated site trains on.

    A datalist named after the site is used as is (real hospital names, ``-c RUNMC,BMC``).
    NVFlare's default names ``site-1 .. site-N`` map onto the prepared client datalists in sorted
    order, so the simulator runs on the prepared sites without renaming anything. The site a
    leave-one-site-out partition keeps out of training gets its ``unseen`` datalist (test only).
    """
    folder = Path(datalist_dir)
    if not folder.is_dir():
        raise DataError(folder, f"no such partition folder; run `fedfms prepare` and `fedfms partition` (or `make demo`), then point the site at them: dataset_dir and datalist_dir in {HINT}, or in the job's config_fed_client.json")
    names = client_datalists(folder)
    if site in names:
        return site
    if site == unseen_site(folder):
        return UNSEEN
    match = re.fullmatch(r"site-(\d+)", site)
    if match and 1 <= int(match.group(1)) <= len(names):
        return names[int(match.group(1)) - 1]
    raise DataError(folder, f"no datalist for site {site!r}; available: {', '.join(names) or 'none'} (run `make demo` or `fedfms partition`)")


class BundleLearner(ModelLearner):
    """Trains a site's share of a MONAI bundle under NVFlare.

    Args:
        bundle_root: the bundle folder, e.g. ``bundles/fedmsa_prostate`` (relative paths: see :mod:`fedfms.paths`).
        config_files: bundle configs merged in order (``["train.json", "cpu_demo.json"]`` for the demo).
        dataset_dir: prepared data folder (``fedfms prepare`` output). A site's own settings
            (:mod:`fedfms.fl.site_settings`) replace this and ``datalist_dir``, ``num_threads``,
            the bundle's ``device`` and where outputs go, without editing the job.
        datalist_dir: folder of the client datalists inside ``dataset_dir`` (a partition).
        local_epochs: epochs of local training per round.
        tracking_writer_id: id of the client's NVFlare ``TBWriter`` component; empty disables streaming.
        num_threads: torch threads for this site's training; 1 when several simulated sites share one
            machine (three sites x two threads on two cores ran 2.5x slower), None keeps torch's default.
        norm_statistics: ``global`` (normalisation statistics travel with the weights) or ``local``
            (FedBN); the server's persistor must be configured the same (:mod:`fedfms.fl.exchange`).
        send_weight_diff: send the change of the weights in this round (NVFlare's WEIGHT_DIFF)
            instead of the weights, as NVFlare's percentile and SVT privacy filters need.
        overrides: further bundle config overrides (e.g. ``{"batch_size": 4}``).
        seed: base of each round's random seed (:meth:`round_seed`).
        ditto_lambda: Ditto: after each round's training of the global model, train the site's
            personal model ``local_epochs`` more, with this weight on its distance to the received
            global model (None: no personal model).
    """

    def __init__(
        self,
        bundle_root: str,
        config_files: list[str] | None = None,
        dataset_dir: str = "demo/data",
        datalist_dir: str = "partitions/natural",
        local_epochs: int = 1,
        tracking_writer_id: str = "tb_writer",
        num_threads: int | None = None,
        norm_statistics: str = "global",
        send_weight_diff: bool = False,
        overrides: dict | None = None,
        seed: int = 0,
        ditto_lambda: float | None = None,
    ) -> None:
        super().__init__()
        if ditto_lambda is not None and not ditto_lambda >= 0:
            raise ValueError(f"ditto_lambda must be >= 0, got {ditto_lambda}")
        self.ditto_lambda = ditto_lambda
        # The first task may already carry torch tensors (NVFlare's TensorDecomposer downloads them),
        # and a site process started for one task (simulator -t below -n) receives it before initialize().
        fobs.register(TensorDecomposer)
        self.seed = seed
        exchanged_keys(torch.nn.Identity(), norm_statistics)  # validates the option
        self.norm_statistics = norm_statistics
        self.send_weight_diff = send_weight_diff
        self.received: dict[str, torch.Tensor] = {}  # the global values of this round
        self.bundle_root = bundle_root
        self.config_files = list(config_files or ["train.json"])
        self.dataset_dir = dataset_dir
        self.datalist_dir = datalist_dir
        self.local_epochs = local_epochs
        self.tracking_writer_id = tracking_writer_id
        self.num_threads = num_threads
        self.overrides = dict(overrides or {})
        self.workflow: ConfigWorkflow | None = None
        self.datalist: str | None = None  # this site's datalist in the partition, set by initialize()
        self.settings = SiteSettings()
        self.initial_local: dict[str, torch.Tensor] = {}  # FedBN: the site-kept layers as built (set by initialize())

    def initialize(self) -> None:
        self._apply_site_settings()
        folder = self.resolved_data / self.datalist_dir
        self.datalist = site_datalist(self.site_name, folder)
        self.writer = self.engine.get_component(self.tracking_writer_id) if self.tracking_writer_id and self.engine else None
        if self.evaluate_only:
            self._initialize_evaluate_only(folder)
            return
        check_datalist(folder / f"{self.datalist}.json", ("training", "validation"))  # before any work: names the file
        self.info(f"site {self.site_name} trains bundle {bundle_dir(self.bundle_root)} on datalist {self.datalist} of {folder}")
        self.workflow = self._workflow([], "train", max_epochs=self.local_epochs)
        self.trainer = self.workflow.trainer
        self.evaluator = self.workflow.parser.get_parsed_content("validate#evaluator")
        self.network = self.trainer.network
        self._keep_initial_local_layers()
        self.num_train_samples = len(self.trainer.data_loader.dataset)

    def _keep_initial_local_layers(self) -> None:
        """The exchanged keys, and the site-kept layers as built: the global model's (FedBN), scored as the global model."""
        self.exchange_keys = exchanged_keys(self.network, self.norm_statistics)
        state = self.network.state_dict()
        self.initial_local = {k: state[k].detach().clone() for k in local_keys(self.network, self.norm_statistics)}

    def _apply_site_settings(self) -> None:
        """This site's own settings over the job's; the data folder must exist."""
        self.settings = read_site_settings(self.site_name, self.workspace.get_site_config_dir() if self.workspace else None)
        self.info(f"site settings of {self.site_name}: {self.settings.describe()}")
        threads = self.settings.num_threads or self.num_threads
        if threads:
            torch.set_num_threads(threads)
        self.datalist_dir = self.settings.datalist_dir or self.datalist_dir
        self.resolved_data = resolve_path(self.settings.dataset_dir or self.dataset_dir)
        if not self.resolved_data.is_dir():
            origin = f"set in {self.settings.source}" if self.settings.dataset_dir else "the job's"
            raise DataError(self.resolved_data, f"site {self.site_name}: no prepared data folder here (dataset_dir, {origin}); set this site's dataset_dir in {HINT}")

    @property
    def site_dir(self) -> Path:
        """Where this site's checkpoints, logs and evaluation tables go: its app folder, or ``<output_dir>/<job id>``."""
        if self.settings.output_dir:
            return Path(self.settings.output_dir) / str(self.job_id)
        return Path(self.app_root or ".")

    @property
    def evaluate_only(self) -> bool:
        """The unseen site of a leave-one-site-out partition: it scores the final model and never trains."""
        return self.datalist == UNSEEN

    def _initialize_evaluate_only(self, folder: Path) -> None:
        check_datalist(folder / f"{UNSEEN}.json", ("testing",))
        self.info(f"site {self.site_name} is the unseen site of {folder}: it only scores the final global model, never trains or sends weights")
        self.network = bundle_network(self.bundle_root, self.config_files, **self._bundle_overrides())
        self._keep_initial_local_layers()

    def _bundle_overrides(self) -> dict:
        """Bundle overrides that put this site's data in, its outputs in :attr:`site_dir`, and its device and cache bounds (if set)."""
        device = {"device": f"$torch.device({self.settings.device!r})"} if self.settings.device else {}
        memory = {key: getattr(self.settings, key) for key in MEMORY_KEYS if getattr(self.settings, key) is not None}
        return {
            "dataset_dir": str(self.resolved_data),
            "datalist_dir": self.datalist_dir,
            "sites": self.datalist,
            "output_dir": str(self.site_dir / "models"),
            "log_dir": str(self.site_dir / "logs"),
            **device,
            **self.overrides,
            **memory,  # the site's own bound wins over the job's
        }

    def _workflow(self, extra_configs: list[str], workflow_type: str, **overrides) -> ConfigWorkflow:
        return bundle_workflow(self.bundle_root, self.config_files + extra_configs, workflow_type, **{**self._bundle_overrides(), **overrides})

    def train(self, model: FLModel) -> FLModel:
        """Local epochs from the global weights; only the trainable parameters go back.

        NVFlare's ModelLearnerExecutor scores the received global model with :meth:`validate`
        just before this call and reports that score with the result, so it is not repeated here.
        """
        self._refuse_if_evaluate_only("train")
        self._load_global(model)
        task = model.meta or {}
        state = self._site_state(task)
        algorithm_meta = self._train_round(task, state)
        local_dice = float(self.evaluator.state.metrics.get("val_mean_dice", float("nan")))
        self._track("local_val_dice", local_dice)
        params = self._values(self.exchange_keys)
        if self.send_weight_diff:
            params = {k: v - self.received[k].to(v.dtype) for k, v in params.items()}
        meta = {
            FLMetaKey.NUM_STEPS_CURRENT_ROUND: self.num_train_samples,
            "num_train_samples": self.num_train_samples,
            "local_val_dice": local_dice,
            "datalist": self.datalist,
            **algorithm_meta,
        }
        if self.initial_local:
            state.save(LOCAL_LAYERS, self._values(self.initial_local))
        if self.ditto_lambda is not None:
            meta["personal_val_dice"] = self._train_personal(state)
        return FLModel(params=params, params_type=ParamsType.DIFF if self.send_weight_diff else ParamsType.FULL, current_round=self.current_round, meta=meta)

    def _train_round(self, task: dict, state: SiteState) -> dict:
        """The round's local epochs as the task's algorithm asks (FedProx's term, SCAFFOLD's corrections); what the update must add to its meta."""
        controls = task.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
        scaffold = ScaffoldSteps(self.trainer, self.network, set(self.exchange_keys)) if controls else None
        with contextlib.ExitStack() as algorithm:
            mu = task.get(AlgorithmConstants.FEDPROX_MU)
            if mu:
                algorithm.enter_context(proximal_training(self.trainer, self.network, self.received, float(mu)))
            if scaffold:
                algorithm.enter_context(scaffold.correcting(controls, state.load(SCAFFOLD_CONTROLS)))
            self._train_local()
        if not scaffold:
            return {}
        controls = scaffold.finish(self.received)
        state.save(SCAFFOLD_CONTROLS, controls["local"])
        return {AlgorithmConstants.SCAFFOLD_CTRL_DIFF: controls["deltas"]}

    def _values(self, keys) -> dict[str, torch.Tensor]:
        """A snapshot (not the live tensors) of the network's ``keys``."""
        keys = set(keys)
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items() if k in keys}

    def _load_values(self, values: dict) -> None:
        state = self.network.state_dict()
        with torch.no_grad():
            for name, value in values.items():
                state[name].copy_(torch.as_tensor(value))

    def _site_state(self, task: dict) -> SiteState:
        """This site's files for the run the task belongs to, in its output folder or its workspace (kept across jobs)."""
        root = self.settings.output_dir or (self.workspace.get_root_dir() if self.workspace else self.site_dir)
        return SiteState(root, task.get(RUN_ID) or self.job_id)

    def _train_personal(self, state: SiteState) -> float:
        """Ditto: the site's personal model (the received global model at first) trained toward the global one; its validation Dice."""
        self._load_values(state.load(PERSONAL_MODEL) or self.received)
        with proximal_training(self.trainer, self.network, self.received, self.ditto_lambda):
            self._train_local(track=False)
        state.save(PERSONAL_MODEL, self._values(self.exchange_keys))
        dice = self._validate()
        self._track("personal_val_dice", dice)
        return dice

    def validate(self, model: FLModel) -> FLModel:
        """Score the received global model: on the validation split, or on the test split when asked."""
        testing = (model.meta or {}).get("split") == "testing"
        if not testing:
            self._refuse_if_evaluate_only("validation")
        self._load_global(model)
        if testing:
            # The rounds never score the final model (no round follows): its validation Dice goes with its test scores.
            validation = {} if self.evaluate_only else {"val_mean_dice": self._validate()}
            scores = {**self._test_global_and_personalised(model.meta or {}), **validation}
            kind = ("Ditto's personal model" if self.ditto_lambda is not None else "the global weights with the site's own normalisation layers (FedBN)")
            return FLModel(metrics=scores, meta={"personalised": kind} if any(k.startswith(PERSONALISED) for k in scores) else {})
        dice = self._validate()
        self._track("global_val_dice", dice)
        return FLModel(metrics={"val_mean_dice": dice})

    def _refuse_if_evaluate_only(self, task: str) -> None:
        if self.evaluate_only:
            raise RuntimeError(
                f"site {self.site_name} is the unseen site of this leave-one-site-out partition and only scores the final model; "
                f"it refuses {task} (list it in the server's evaluate_only_sites so it gets no such task)"
            )

    def finalize(self) -> None:
        if self.workflow is not None:
            self.workflow.finalize()

    def _load_global(self, model: FLModel) -> None:
        """Copy the received values into the network; other keys or non-finite values are refused, naming the key."""
        received = set(model.params or {})
        expected = set(self.exchange_keys)
        if received != expected:
            missing, extra = sorted(expected - received)[:5], sorted(received - expected)[:5]
            raise ValueError(f"global model keys differ from the exchanged keys of this site: missing {missing}, unexpected {extra}")
        values = {k: torch.as_tensor(v) for k, v in model.params.items()}
        bad = next((k for k, v in values.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise ValueError(f"refusing the global model of round {self.current_round}: {bad} holds non-finite values (NaN or Inf)")
        state = self.network.state_dict()
        with torch.no_grad():
            for name, value in values.items():
                state[name].copy_(value)
        self.received = {k: v.detach().cpu().clone() for k, v in values.items()}
        if self.initial_local:  # FedBN: this site's own layers, as its last round left them
            self._load_values(self._site_state(model.meta or {}).load(LOCAL_LAYERS) or {})
        values = sum(v.numel() for v in values.values())
        self.info(f"round {self.current_round}: global model received, {len(received)} tensors, {values:,} values")

    def _validate(self) -> float:
        self.evaluator.run()
        return float(self.evaluator.state.metrics.get("val_mean_dice", float("nan")))

    def _test_global_and_personalised(self, task: dict) -> dict:
        """Test scores of the global model as the server saved it and, under Ditto or FedBN, of this site's personalised model.

        The personalised scores carry the prefix ``personalised_``: Ditto's personal model, or (FedBN)
        the global weights with this site's own normalisation layers.
        """
        global_values = self._values(self.exchange_keys)
        self._load_values(self.initial_local)  # FedBN: the global model holds the layers it started with
        scores = self._test("global")
        state = self._site_state(task)
        personal = {**(state.load(LOCAL_LAYERS) or {}), **((state.load(PERSONAL_MODEL) or {}) if self.ditto_lambda is not None else {})}
        if not personal:
            return scores
        self._load_values({**global_values, **personal})
        return {**scores, **{PERSONALISED + k: v for k, v in self._test("personalised").items()}}

    def _test(self, which: str) -> dict:
        """The bundle's evaluation (evaluate.json) of the current network on this site's test split; ``which``: global or personalised."""
        checkpoint = self.site_dir / "models" / f"{which}_model_for_test.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.network.state_dict()}, checkpoint)
        folder = self.site_dir / ("eval" if which == "global" else f"eval_{which}")
        return evaluate_checkpoint(self.bundle_root, self.config_files, checkpoint, folder, **self._bundle_overrides())

    def round_seed(self) -> int:
        """This round's seed at this site's data: the same whichever process runs the round."""
        return zlib.crc32(f"{self.seed}/{self.datalist}/{self.current_round or 0}".encode())

    def _train_local(self, track: bool = True) -> None:
        """``local_epochs`` epochs of the bundle's trainer, from a state that depends only on the round.

        The optimiser's moments start empty, the random streams (torch, NumPy, Python and the
        random transforms of the training data) are seeded by :meth:`round_seed`, and the epoch
        count continues the global one (round x local_epochs), as a process kept since round 0
        would have it: checkpoints and the site's own TensorBoard line up whatever ran them.
        """
        self.trainer.optimizer.state.clear()
        seed = self.round_seed()
        set_determinism(seed)
        set_rnd(self.trainer.data_loader.dataset, seed)
        state = self.trainer.state
        state.epoch = (self.current_round or 0) * self.local_epochs
        state.iteration = state.epoch * (state.epoch_length or len(self.trainer.data_loader))
        state.max_epochs = state.epoch + self.local_epochs
        self.trainer.run()
        if track:
            self._track("train_loss", float(state.output[0]["loss"]) if isinstance(state.output, list) else float(state.output["loss"]))

    def _track(self, tag: str, value: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, global_step=self.current_round or 0)
