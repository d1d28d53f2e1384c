"""FedOpt (Reddi et al., "Adaptive Federated Optimization", 2021) on :class:`~fedfms.fl.workflows.fedavg.ResumableFedAvg`.

Each round the sample-weighted mean of the sites' changes is taken as the negative gradient of a
server optimiser: SGD (FedAvgM with momentum; SGD with lr 1 and no momentum is FedAvg itself),
Adam (FedAdam) or :class:`Yogi` (FedYogi). Running normalisation statistics are buffers, not
weights: they take the mean change, as in NVFlare's FedOpt.

Why not NVFlare's ``nvflare.app_opt.pt.fedopt_ctl.FedOpt``: its ``run()`` builds the optimiser and
then runs FedAvg's own round loop (no timeouts, no update checks, no records), its update replaces
the global model with the whole state dict of the server's network, frozen weights included (they
must never travel), and its optimiser state lives only in memory, so a restarted server would
start the moments afresh. Here the optimiser is built the same way (a class path and its
arguments; two keys, since NVFlare's job configuration builds any ``{"path", "args"}`` dict into an
object on its own), steps only the exchanged floating tensors, and its state is saved with every
global model and restored on resume.
"""

from __future__ import annotations

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedfms.fl.exchange import RUNNING_STATISTICS
from fedfms.fl.workflows.fedavg import ResumableFedAvg, _like

#: Key of the saved global model's meta: the server optimiser's state, restored on resume.
OPTIMIZER_STATE = "server_optimizer_state"
#: The server optimisers ``fedfms job --server-optimizer`` offers, by name: their class path.
SERVER_OPTIMIZERS = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "yogi": "fedfms.fl.workflows.fedopt.Yogi"}


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al. 2018) as FedYogi uses it (Reddi et al. 2021, Algorithm 2), without bias correction.

    ``v <- v - (1 - beta2) g^2 sign(v - g^2)``: the second moment grows or shrinks by at most
    ``(1 - beta2) g^2`` per step, where Adam's moves towards ``g^2`` multiplicatively.

    Args:
        params: the tensors to optimise.
        lr: the server learning rate (eta).
        betas: (beta1, beta2), the decay of the first and second moments.
        eps: tau, the adaptivity floor added to ``sqrt(v)`` (Reddi et al. use 1e-3).
        initial_accumulator: the second moment's start (tau^2 in Reddi et al.).
    """

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-3,
                 initial_accumulator: float = 1e-6) -> None:
        if not lr > 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Yogi needs lr > 0, eps > 0 and betas in [0, 1), got lr {lr}, eps {eps}, betas {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "initial_accumulator": initial_accumulator})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.full_like(param, group["initial_accumulator"])
                grad, m, v = param.grad, state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                squared = grad * grad
                v.addcmul_(torch.sign(v - squared), squared, value=-(1 - beta2))
                param.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])


def server_optimizer_args(name: str, lr: float = 1.0, momentum: float = 0.0) -> dict:
    """The ``optimizer`` and ``optimizer_args`` of :class:`ResumableFedOpt` for ``name`` (sgd, adam or yogi).

    ``momentum`` is SGD's, or Adam's and Yogi's beta1.
    """
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimiser {name!r}; choose from {', '.join(SERVER_OPTIMIZERS)}")
    if not lr > 0 or not 0 <= momentum < 1:
        raise ValueError(f"the server optimiser needs lr > 0 and momentum in [0, 1), got lr {lr} and momentum {momentum}")
    args = {"lr": lr, "momentum": momentum} if name == "sgd" else {"lr": lr, "betas": [momentum, 0.99], "eps": 1e-3}
    return {"optimizer": SERVER_OPTIMIZERS[name], "optimizer_args": args}


class ResumableFedOpt(ResumableFedAvg):
    """:class:`ResumableFedAvg` whose global model moves by a server optimiser (see the module docstring).

    Args:
        optimizer: the server optimiser's class path (:data:`SERVER_OPTIMIZERS`); default SGD.
        optimizer_args: its arguments but ``params`` (:func:`server_optimizer_args`); default lr 1
            and no momentum, i.e. FedAvg.
        kwargs: :class:`ResumableFedAvg` arguments.
    """

    needs_mean_change = "FedOpt"

    def __init__(self, *args, optimizer: str = SERVER_OPTIMIZERS["sgd"], optimizer_args: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer_path = optimizer
        self.optimizer_args = dict(optimizer_args if optimizer_args is not None else {"lr": 1.0})
        self.weights: dict[str, torch.nn.Parameter] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved_state: dict | None = None

    def server_state(self) -> dict:
        state = self.optimizer.state_dict() if self.optimizer is not None else self._saved_state
        return {**super().server_state(), OPTIMIZER_STATE: state}

    def restore_server_state(self, meta: dict) -> None:
        super().restore_server_state(meta)
        self._saved_state = meta.get(OPTIMIZER_STATE)
        if self._saved_state:
            self.info("server optimiser state restored from the saved global model")

    def _optimizer(self, model: FLModel) -> torch.optim.Optimizer:
        """The server optimiser over the exchanged floating weights (not running statistics), built at the first update."""
        if self.optimizer is None:
            names = sorted(k for k, v in model.params.items() if _is_weight(k, v))
            self.weights = {k: torch.nn.Parameter(torch.as_tensor(np.asarray(model.params[k])).clone()) for k in names}
            args = {**self.optimizer_args, "params": list(self.weights.values())}
            self.optimizer = self.build_component({"path": self.optimizer_path, "args": args})
            if self._saved_state:
                self.optimizer.load_state_dict(self._saved_state)
            self.info(f"server optimiser {self.optimizer_path} {self.optimizer_args} over {len(names)} exchanged weights")
        return self.optimizer

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        """One optimiser step with the round's mean change as the negative gradient; statistics take the mean change."""
        optimizer = self._optimizer(model)
        diff = aggr_result.params_type == ParamsType.DIFF
        changes = {k: torch.as_tensor(np.asarray(v)) - (0 if diff else torch.as_tensor(np.asarray(model.params[k]))) for k, v in aggr_result.params.items()}
        optimizer.zero_grad()
        with torch.no_grad():
            for key, weight in self.weights.items():
                weight.copy_(torch.as_tensor(np.asarray(model.params[key])))  # the global model as it is (a resumed run starts there)
                weight.grad = -changes[key].to(weight.dtype) if key in changes else None
        optimizer.step()
        params = dict(model.params)
        for key, change in changes.items():
            value = self.weights[key].detach() if key in self.weights else torch.as_tensor(np.asarray(params[key])) + change
            params[key] = _like(params[key], value)
        lr = optimizer.param_groups[0]["lr"]
        self.info(f"round {self.current_round}: server optimiser step (lr {lr:g}) on {len(self.weights)} weights, mean change on {len(changes) - len(self.weights)} others")
        step = FLModel(params=params, params_type=ParamsType.FULL, meta=aggr_result.meta, metrics=aggr_result.metrics)
        return super().update_model(model, step)


def _is_weight(key: str, value) -> bool:
    """A tensor the server optimiser steps: floating, and not a running statistic of a normalisation layer."""
    return np.issubdtype(np.asarray(value).dtype, np.floating) and not key.endswith(RUNNING_STATISTICS)
