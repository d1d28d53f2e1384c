"""Server-side model persistence for partial (trainable-only) exchange, with resume after a restart."""

from __future__ import annotations

import os

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants, DefaultCheckpointFileName
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from torch import nn

from fedfms.paths import resolve_path

#: Key of ``meta_props`` in a saved global model: how many rounds had finished when it was saved.
COMPLETED_ROUNDS = "completed_rounds"
#: The model round 0 started from (random, pre-trained or distilled), saved by the FM-instructed-init workflow.
INITIAL_MODEL = "initial_global_model.pt"


class TrainableModelPersistor(PTFileModelPersistor):
    """Keeps the full model on disk but hands the workflow only the trainable parameters.

    The global model the controller sends out therefore holds exactly the strategy's trainable
    parameters, and so do the clients' answers. Saving merges these partial updates into the full
    checkpoint (``PTFileModelPersistor``'s persistence manager accepts partial updates), so
    ``FL_global_model.pt`` is always a complete, loadable state dict. Each save also records the
    number of completed rounds in the checkpoint's ``meta_props``.

    Args:
        resume_from: a global model saved by an earlier run of the same job (its
            ``FL_global_model.pt``). The run starts from those weights, and
            :class:`fedfms.fl.fedavg.ResumableFedAvg` continues after the rounds it records.
            Relative paths: see :mod:`fedfms.paths`. None starts from the bundle's initial network.
        kwargs: ``PTFileModelPersistor`` arguments (``model``, file names, ...).
    """

    def __init__(self, *args, resume_from: str | None = None, **kwargs) -> None:
        if resume_from:
            kwargs["source_ckpt_file_full_name"] = str(resolve_path(resume_from).resolve())
        super().__init__(*args, **kwargs)

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
        self.save_model_file(self._ckpt_save_path)

    def save_initial_model(self, fl_ctx: FLContext) -> str:
        """Save the model round 0 starts from as ``initial_global_model.pt`` beside the global model; return its path."""
        self.load_model(fl_ctx)  # (re)builds the persisted copy from the current weights
        path = os.path.join(os.path.dirname(self._ckpt_save_path), INITIAL_MODEL)
        self.save_model_file(path)
        self.log_info(fl_ctx, f"initial global model saved to {path}")
        return path

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.model.named_parameters() if p.requires_grad}

    def exchanged(self, learnable: ModelLearnable) -> ModelLearnable:
        """``learnable`` restricted to the trainable parameters, the part that travels."""
        weights, trainable = learnable[ModelLearnableKey.WEIGHTS], self.trainable_names()
        learnable[ModelLearnableKey.WEIGHTS] = {k: v for k, v in weights.items() if k in trainable}
        return learnable

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        learnable = super().load_model(fl_ctx)
        if learnable is None or self.model is None:
            return learnable
        total = len(learnable[ModelLearnableKey.WEIGHTS])
        learnable = self.exchanged(learnable)
        self.log_info(fl_ctx, f"global model: {len(learnable[ModelLearnableKey.WEIGHTS])} trainable of {total} tensors are exchanged")
        if self.source_ckpt_file_full_name:
            done = (learnable.get(ModelLearnableKey.META) or {}).get(COMPLETED_ROUNDS, 0)
            self.log_info(fl_ctx, f"resuming from {self.source_ckpt_file_full_name}, saved after {done} completed rounds")
            # This run's global model starts as the resumed one, so it exists even if no round is left to run.
            self.save_model_file(self._ckpt_save_path)
        return learnable

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if current_round is not None:
            ml[ModelLearnableKey.META] = {**(ml.get(ModelLearnableKey.META) or {}), COMPLETED_ROUNDS: int(current_round) + 1}
        super().save_model(ml, fl_ctx)

    def global_model_path(self) -> str:
        """Where the full global model (``{"model": state_dict, ...}``) is saved each round."""
        return self._ckpt_save_path

    def final_model(self, fl_ctx: FLContext) -> ModelLearnable | None:
        """The last saved global model (trainable part), or None before any round was saved."""
        learnable = self.get_model(DefaultCheckpointFileName.GLOBAL_MODEL, fl_ctx)
        return self.exchanged(learnable) if learnable is not None else None
