"""Server-side model persistence for partial exchange, guarded saves, and resume after a restart."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants, DefaultCheckpointFileName
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from torch import nn

from fedfms.errors import DataError
from fedfms.io import atomic_write, load_torch_file
from fedfms.fl.exchange import exchanged_keys
from fedfms.paths import resolve_path

#: Key of ``meta_props`` in a saved global model: how many rounds had finished when it was saved.
COMPLETED_ROUNDS = "completed_rounds"
#: The model round 0 started from (random, pre-trained or distilled), saved by the FM-instructed-init workflow.
INITIAL_MODEL = "initial_global_model.pt"
GLOBAL_MODEL = "FL_global_model.pt"
BEST_MODEL = "best_FL_global_model.pt"


def resume_folder(resume_from: str | os.PathLike) -> Path:
    """The earlier run's server app folder: ``resume_from`` itself, or the folder of its ``FL_global_model.pt``."""
    path = resolve_path(resume_from).resolve()
    return path if path.is_dir() else path.parent


def read_resume_model(resume_from: str | os.PathLike) -> dict:
    """The saved global model a run resumes from, checked: it must be a global model this project saved."""
    path = resolve_path(resume_from).resolve()
    path = path / GLOBAL_MODEL if path.is_dir() else path
    missing = "no global model to resume from (expected the FL_global_model.pt of an earlier run, or its folder)"
    saved = load_torch_file(path, missing, "a saved global model", weights_only=False)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise DataError(path, "is not a global model saved by an NVFlare PyTorch persistor (no 'model' state dict)")
    return saved


#: Model builders a persistor may call at run start from a ``"config_type": "dict"`` model config.
DEFERRED_MODELS = ("fedfms.bundle.bundle_network",)


def check_deferred_model(model: dict) -> None:
    """Check a model config the persistor builds at run start: a known builder, and a bundle with the named config files."""
    path, args = model.get("path"), model.get("args") or {}
    if path not in DEFERRED_MODELS:
        raise ValueError(f"a model built at run start (config_type dict) must be one of {', '.join(DEFERRED_MODELS)}, not {path!r}; "
                         "give other models as a component (without config_type) so NVFlare's class allow-list checks them")
    bundle_root = args.get("bundle_root")
    if bundle_root is None:
        raise ValueError(f"the persistor's model {path} needs a bundle_root")
    configs = resolve_path(bundle_root) / "configs"
    if not configs.is_dir():
        raise DataError(configs.parent, f"no MONAI bundle here (no configs/ folder); the persistor's model names bundle_root {bundle_root}")
    for name in args.get("config_files") or ["train.json"]:
        if not (configs / name).is_file():
            raise DataError(configs / name, f"the persistor's model names config file {name}, which bundle {bundle_root} does not have")


class TrainableModelPersistor(PTFileModelPersistor):
    """Keeps the full model on disk but hands the workflow only what travels (:mod:`fedfms.fl.exchange`).

    The global model the controller sends out holds exactly the exchanged tensors (the strategy's
    trainable parameters and, by default, normalisation statistics), and so do the clients'
    answers. Saving merges these partial updates into the full checkpoint, so
    ``FL_global_model.pt`` is always a complete, loadable state dict, saved at once when the run
    starts and after every round, with the number of completed rounds in its ``meta_props``.
    A save that would write a key outside the exchanged set or a non-finite value is refused: the
    update checks should have stopped it, so it is a bug, and the saved model stays as it was.

    Args:
        resume_from: the server app folder of an earlier run of the same job (or its
            ``FL_global_model.pt``). The run starts from that global model, keeps its best model,
            and :class:`fedfms.fl.workflows.fedavg.ResumableFedAvg` continues after the rounds it records.
            Relative paths: see :mod:`fedfms.paths`. None starts from the bundle's initial network.
        norm_statistics: ``global`` (normalisation statistics travel) or ``local`` (FedBN).
        kwargs: ``PTFileModelPersistor`` arguments (``model``, file names, ...).

    The shipped jobs give ``model`` as ``{"path": "fedfms.bundle.bundle_network", "args": {...},
    "config_type": "dict"}``: NVFlare's component builder then leaves the dict alone and
    ``PTFileModelPersistor`` builds the network when the run starts (``START_RUN``). Building it
    there, not while the server reads its configuration, lets the simulator start the sites'
    processes while the server imports MONAI and builds the network (the simulator starts no site
    before the server app is up). Such a deferred model must be one of :data:`DEFERRED_MODELS`
    (NVFlare's class allow-list does not see it), and its bundle is looked up now, so a wrong
    ``bundle_root`` or config file is still an error when the job starts.
    """

    def __init__(self, *args, resume_from: str | None = None, norm_statistics: str = "global", **kwargs) -> None:
        self.resume_from = resume_from
        if resume_from:
            read_resume_model(resume_from)  # a bad file is an error now, naming it, not at round 0
            kwargs["source_ckpt_file_full_name"] = str(resume_folder(resume_from) / GLOBAL_MODEL)
        if isinstance(kwargs.get("model"), dict):
            check_deferred_model(kwargs["model"])
        super().__init__(*args, **kwargs)
        exchanged_keys(nn.Identity(), norm_statistics)  # validates the option
        self.norm_statistics = norm_statistics
        self._saved_once = False

    @property
    def resuming(self) -> bool:
        """Whether the run starts from a saved global model (``resume_from``) rather than the built one."""
        return bool(self.source_ckpt_file_full_name)

    def adopt_initial_model(self, network: nn.Module, fl_ctx: FLContext) -> None:
        """Make ``network``'s weights the initial global model, e.g. a student a server pre-stage trained.

        The weights are copied into this persistor's model (same architecture, every key), so the
        workflow's first ``load_model`` hands them to round 0. They are saved at once, as
        ``initial_global_model.pt`` and as ``FL_global_model.pt`` with no completed rounds, so a
        run stopped in round 0 can resume from the pre-trained start instead of repeating the
        pre-stage.
        """
        if self.resuming:
            raise RuntimeError("a resumed run starts from its saved global model; it takes no new initial model")
        self.model.load_state_dict(network.state_dict())
        self.save_initial_model(fl_ctx)

    def save_initial_model(self, fl_ctx: FLContext) -> str:
        """Save the model round 0 starts from as ``initial_global_model.pt`` beside the global model; return its path."""
        self.load_model(fl_ctx)  # (re)builds the persisted copy from the current weights
        path = os.path.join(os.path.dirname(self._ckpt_save_path), INITIAL_MODEL)
        self.save_model_file(path)
        self.log_info(fl_ctx, f"initial global model saved to {path}")
        return path

    def exchanged_names(self) -> set[str]:
        return set(exchanged_keys(self.model, self.norm_statistics))

    def exchanged(self, learnable: ModelLearnable) -> ModelLearnable:
        """``learnable`` restricted to the tensors that travel."""
        weights, exchanged = learnable[ModelLearnableKey.WEIGHTS], self.exchanged_names()
        learnable[ModelLearnableKey.WEIGHTS] = {k: v for k, v in weights.items() if k in exchanged}
        return learnable

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        learnable = super().load_model(fl_ctx)
        if learnable is None or self.model is None:
            return learnable
        total = len(learnable[ModelLearnableKey.WEIGHTS])
        learnable = self.exchanged(learnable)
        self.log_info(fl_ctx, f"global model: {len(learnable[ModelLearnableKey.WEIGHTS])} exchanged of {total} tensors ({self.norm_statistics} normalisation statistics)")
        if self.resuming:
            done = (learnable.get(ModelLearnableKey.META) or {}).get(COMPLETED_ROUNDS, 0)
            self.log_info(fl_ctx, f"resuming from {self.source_ckpt_file_full_name}, saved after {done} completed rounds")
            self._carry_best_model()
        if not self._saved_once:
            # The run's global model exists from the start, so a run that ends in round 0 still has one to evaluate.
            self.save_model_file(self._ckpt_save_path)
            self._saved_once = True
        return learnable

    def _carry_best_model(self) -> None:
        earlier = resume_folder(self.resume_from) / BEST_MODEL
        if earlier.is_file() and not os.path.exists(self._best_ckpt_save_path):
            shutil.copyfile(earlier, self._best_ckpt_save_path)

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        self._check_update(ml[ModelLearnableKey.WEIGHTS])
        ml[ModelLearnableKey.WEIGHTS] = self._with_aliases(ml[ModelLearnableKey.WEIGHTS])
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if current_round is not None:
            ml[ModelLearnableKey.META] = {**(ml.get(ModelLearnableKey.META) or {}), COMPLETED_ROUNDS: int(current_round) + 1}
        super().save_model(ml, fl_ctx)

    def _with_aliases(self, weights: dict) -> dict:
        """``weights`` and, for each, the other state-dict names of the same tensor (e.g. DynUNet's ``skip_layers``).

        Only one name of a shared tensor travels; the file keeps every name, and the last one
        wins when it is loaded, so every name must carry the new value.
        """
        aliases = self._aliases
        return {**weights, **{alias: value for key, value in weights.items() for alias in aliases.get(key, ())}}

    @functools.cached_property
    def _aliases(self) -> dict[str, list[str]]:
        """Each state-dict name of a tensor with several names, and all its names (the network is fixed: found once)."""
        names: dict[int, list[str]] = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            names.setdefault(value.data_ptr(), []).append(key)
        return {key: group for group in names.values() if len(group) > 1 for key in group}

    def _check_update(self, weights: dict) -> None:
        outside = sorted(set(weights) - self.exchanged_names())
        if outside:
            raise ValueError(f"refusing to save the global model: {len(outside)} keys outside the exchanged set, e.g. {outside[0]}")
        for key, value in weights.items():
            array = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
            if array.is_floating_point() and not bool(torch.isfinite(array).all()):
                raise ValueError(f"refusing to save the global model: {key} holds non-finite values")

    def keep_final_as_best(self) -> None:
        """The last saved global model becomes the best one (it out-scored the best of the rounds; see FinalEvaluation)."""
        atomic_write(self._best_ckpt_save_path, lambda tmp: shutil.copyfile(self._ckpt_save_path, tmp))

    def final_model(self, fl_ctx: FLContext) -> ModelLearnable | None:
        """The last saved global model (exchanged part), or None before any was saved."""
        learnable = self.get_model(DefaultCheckpointFileName.GLOBAL_MODEL, fl_ctx)
        return self.exchanged(learnable) if learnable is not None else None
