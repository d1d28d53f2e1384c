"""Server-side model persistence for partial (trainable-only) exchange."""

from __future__ import annotations

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor


class TrainableModelPersistor(PTFileModelPersistor):
    """Keeps the full model on disk but hands the workflow only the trainable parameters.

    The global model the controller sends out therefore holds exactly the strategy's trainable
    parameters, and so do the clients' answers. Saving merges these partial updates into the full
    checkpoint (``PTFileModelPersistor``'s persistence manager accepts partial updates), so
    ``FL_global_model.pt`` is always a complete, loadable state dict.
    """

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        learnable = super().load_model(fl_ctx)
        if learnable is None or self.model is None:
            return learnable
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        weights = learnable[ModelLearnableKey.WEIGHTS]
        learnable[ModelLearnableKey.WEIGHTS] = {k: v for k, v in weights.items() if k in trainable}
        self.log_info(fl_ctx, f"global model: {len(trainable)} trainable of {len(weights)} tensors are exchanged")
        return learnable
