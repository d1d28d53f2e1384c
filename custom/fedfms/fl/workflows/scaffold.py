"""SCAFFOLD (Karimireddy et al. 2020) on :class:`~fedfms.fl.workflows.fedavg.ResumableFedAvg`.

The server keeps global control variates ``c`` for the exchanged trainable weights and sends them
with every task (NVFlare's contract: ``meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL]``); each site
corrects its local steps by ``c - c_i`` and answers with its weights and the change of its own
controls (``meta[SCAFFOLD_CTRL_DIFF]``, computed by NVFlare's ``PTScaffoldHelper`` in
:mod:`fedfms.fl.executors.algorithms`). The update checks refuse an update whose control change
is missing, of other keys or shapes, not finite or too large, like any bad weight; ``c`` moves by
the sample-weighted mean of the accepted sites' control changes, as NVFlare's ``Scaffold`` does.

Why not NVFlare's ``nvflare.app_common.workflows.scaffold.Scaffold``: it has its own round loop
(``send_model_and_wait`` with no timeout and no update checks) and keeps ``c`` only in memory, so
it can neither refuse a bad update nor resume. Here ``c`` is saved with every global model.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AlgorithmConstants

from fedfms.fl.workflows.fedavg import ResumableFedAvg

#: Key of the saved global model's meta: the global control variates, restored on resume.
CONTROLS_STATE = "scaffold_global_controls"


class ResumableScaffold(ResumableFedAvg):
    """:class:`ResumableFedAvg` with SCAFFOLD's control variates (see the module docstring)."""

    needs_mean_change = "SCAFFOLD"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.controls: dict[str, torch.Tensor] | None = None  # torch: the persistor saves meta for a weights-only load

    @functools.cached_property
    def trainable(self) -> set[str]:
        """The server network's trainable parameter names (fixed for the run)."""
        return {name for name, p in self.persistor.model.named_parameters() if p.requires_grad}

    def control_keys(self, params: dict) -> dict[str, tuple]:
        """The exchanged weights that carry a control variate: the model's trainable parameters (not statistics)."""
        return {k: tuple(np.shape(v)) for k, v in params.items() if k in self.trainable}

    def server_state(self) -> dict:
        return {**super().server_state(), CONTROLS_STATE: self.controls}

    def restore_server_state(self, meta: dict) -> None:
        super().restore_server_state(meta)
        saved = meta.get(CONTROLS_STATE)
        self.controls = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in saved.items()} if saved else None
        if saved:
            self.info(f"SCAFFOLD global controls restored for {len(saved)} weights")

    def task_meta(self) -> dict:
        return {**super().task_meta(), AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: self.controls}

    def _round(self, model: FLModel) -> bool:
        shapes = self.control_keys(model.params)
        if self.controls is None:
            self.controls = {k: torch.zeros(shape, dtype=torch.float32) for k, shape in shapes.items()}
        self.validator.expect_controls(shapes)
        return super()._round(model)

    def _aggregated(self, model: FLModel) -> FLModel:
        """The weights as FedAvg adds them, and ``c`` moved by the weighted mean of the accepted control changes."""
        helper = WeightedAggregationHelper()
        for site in sorted(self._accepted):
            update = self._accepted[site]
            helper.add(data=update.meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF], weight=float(update.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND]),
                       contributor_name=site, contribution_round=self.current_round)
        mean_change = helper.get_result()
        for key, change in mean_change.items():
            self.controls[key] = self.controls[key] + torch.as_tensor(np.asarray(change), dtype=torch.float32)
        return super()._aggregated(model)
