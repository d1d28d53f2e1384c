"""FedAvg that continues an interrupted run instead of starting over."""

from __future__ import annotations

from nvflare.app_common.workflows.fedavg import FedAvg

from fedfms.fl.persistor import COMPLETED_ROUNDS


class ResumableFedAvg(FedAvg):
    """NVFlare's FedAvg, resuming after the rounds recorded in the persistor's starting model.

    ``num_rounds`` is the total for the whole run. When the persistor starts from a saved global
    model (:class:`fedfms.fl.persistor.TrainableModelPersistor` with ``resume_from``), that model
    records how many rounds were completed; the rounds continue from the next one until the total
    is reached, so a restarted server picks up where the last saved global model left off. With no
    record the run starts at round 0, exactly as ``FedAvg``.
    """

    def run(self) -> None:
        model = self.load_model()
        completed = int((model.meta or {}).get(COMPLETED_ROUNDS, 0))
        total = self.start_round + self.num_rounds
        if completed >= total:
            self.info(f"the starting model already completed {completed} of {total} rounds; no rounds left")
            return
        if completed:
            self.info(f"resuming at round {completed}: {total - completed} of {total} rounds left")
        start = max(self.start_round, completed)
        self.model, self.start_round, self.num_rounds = model, start, total - start
        super().run()
