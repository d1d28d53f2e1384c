"""Server-side model persistence for partial (trainable-only) exchange."""

from __future__ import annotations

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import DefaultCheckpointFileName
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor


class TrainableModelPersistor(PTFileModelPersistor):
    """Keeps the full model on disk but hands the workflow only the trainable parameters.

    The global model the controller sends out therefore holds exactly the strategy's trainable
    parameters, and so do the clients' answers. Saving merges these partial updates into the full
    checkpoint (``PTFileModelPersistor``'s persistence manager accepts partial updates), so
    ``FL_global_model.pt`` is always a complete, loadable state dict.
    """

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.model.named_parameters() if p.requires_grad}

    def exchanged(self, learnable: ModelLearnable) -> ModelLearnable:
        """``learnable`` restricted to the trainable parameters, the part that travels."""
        weights = learnable[ModelLearnableKey.WEIGHTS]
        learnable[ModelLearnableKey.WEIGHTS] = {k: v for k, v in weights.items() if k in self.trainable_names()}
        return learnable

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        learnable = super().load_model(fl_ctx)
        if learnable is None or self.model is None:
            return learnable
        total = len(learnable[ModelLearnableKey.WEIGHTS])
        learnable = self.exchanged(learnable)
        self.log_info(fl_ctx, f"global model: {len(learnable[ModelLearnableKey.WEIGHTS])} trainable of {total} tensors are exchanged")
        return learnable

    def final_model(self, fl_ctx: FLContext) -> ModelLearnable | None:
        """The last saved global model (trainable part), or None before any round was saved."""
        learnable = self.get_model(DefaultCheckpointFileName.GLOBAL_MODEL, fl_ctx)
        return self.exchanged(learnable) if learnable is not None else None
