"""A site's part of FedProx, SCAFFOLD and Ditto, around the bundle's own trainer.

The server says per task what the site must do (NVFlare's contracts in the task's meta): a
FedProx ``mu`` (``AlgorithmConstants.FEDPROX_MU``), SCAFFOLD's global controls
(``AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL``); Ditto's lambda is the site's learner argument.
Each piece wraps the bundle's ``SupervisedTrainer`` for one local training and leaves it as it was:

* :class:`ProximalLoss`: the bundle's loss plus NVFlare's ``PTFedProxLoss`` between the network's
  trainable parameters and reference values (the received global model): FedProx's local objective,
  and Ditto's for the personal model;
* :class:`ScaffoldSteps`: NVFlare's ``PTScaffoldHelper`` applied after every optimiser step
  (the correction ``-lr (c - c_i)``) and, after training, to the site's own controls;
* :class:`SiteState`: what a site keeps between rounds (its SCAFFOLD controls, Ditto's personal
  model, FedBN's normalisation layers) in files of its own, written atomically, under the run's
  id: a site's process may be a new one every round, and a resumed run continues the same state.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from ignite.engine import Events
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss
from nvflare.app_opt.pt.scaffold import PTScaffoldHelper, get_lr_values
from torch import nn

from fedfms.io import atomic_write, load_torch_file


class ProximalLoss(nn.Module):
    """``base(pred, label) + mu / 2 * ||w - w_ref||^2`` over the network's trainable parameters that have a reference.

    Args:
        base: the bundle's loss.
        network: the network being trained (its parameters are used, not copied).
        reference: the values to stay close to, by state-dict key (the received global model).
        mu: FedProx's mu, Ditto's lambda.
    """

    def __init__(self, base: nn.Module, network: nn.Module, reference: Mapping[str, torch.Tensor], mu: float) -> None:
        super().__init__()
        names = [n for n, p in network.named_parameters() if p.requires_grad and n in reference]
        parameters = dict(network.named_parameters())
        self.base = base
        self.current = nn.ParameterList([parameters[n] for n in names])
        self.reference = nn.ParameterList([nn.Parameter(reference[n].detach().clone().to(parameters[n]), requires_grad=False) for n in names])
        self.proximal = PTFedProxLoss(mu=mu)

    def forward(self, pred, label) -> torch.Tensor:
        return self.base(pred, label) + self.proximal(self.current, self.reference)


@contextlib.contextmanager
def proximal_training(trainer, network: nn.Module, reference: Mapping[str, torch.Tensor], mu: float) -> Iterator[None]:
    """The trainer's loss with the proximal term while the block runs."""
    base = trainer.loss_function
    trainer.loss_function = ProximalLoss(base, network, reference, mu)
    try:
        yield
    finally:
        trainer.loss_function = base


class _Values:
    """A state dict of fixed values (``PTScaffoldHelper`` reads the global model through ``state_dict()``)."""

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        self.values = dict(values)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.values


class ScaffoldSteps:
    """SCAFFOLD's corrected local steps at a site, with NVFlare's ``PTScaffoldHelper``.

    Args:
        trainer: the bundle's trainer (its optimiser's learning rate is SCAFFOLD's local one).
        network: the network it trains.
        exchanged: the keys that travel; controls of other trainable weights (FedBN's local
            layers) correct nothing the server averages, so they are neither kept nor sent.
    """

    def __init__(self, trainer, network: nn.Module, exchanged: set[str]) -> None:
        self.trainer, self.network, self.exchanged = trainer, network, exchanged
        self.helper = PTScaffoldHelper()
        self.helper.init(network)

    def controlled(self) -> list[str]:
        return [n for n, p in self.network.named_parameters() if p.requires_grad and n in self.exchanged]

    @contextlib.contextmanager
    def correcting(self, global_controls: Mapping, local_controls: Mapping | None) -> Iterator[None]:
        """Local training corrected by ``c - c_i`` after every optimiser step (``c_i``: the site's, zero at first)."""
        self.helper.load_global_controls({k: torch.as_tensor(global_controls[k]) for k in self.controlled()})
        if local_controls:
            current = self.helper.c_local.state_dict()
            self.helper.c_local.load_state_dict({**current, **{k: torch.as_tensor(v).to(current[k]) for k, v in local_controls.items()}})
        self.c_global, self.c_local = self.helper.get_params()
        handler = self.trainer.add_event_handler(Events.ITERATION_COMPLETED, self._correct)
        try:
            yield
        finally:
            handler.remove()

    def _correct(self, _engine) -> None:
        self.helper.model_update(self.network, self._lr(), self.c_global, self.c_local)

    def _lr(self) -> float:
        return float(get_lr_values(self.trainer.optimizer)[0])

    def finish(self, received: Mapping[str, torch.Tensor]) -> dict:
        """After training: the site's new controls (to keep) and their change (to send), from the received global model."""
        self.helper.terms_update(self.network, self._lr(), self.c_global, self.c_local, _Values(received))
        keys = set(self.controlled())
        deltas = {k: v for k, v in self.helper.get_delta_controls().items() if k in keys}
        local = {k: v for k, v in self.helper.c_local.state_dict().items() if k in keys}
        return {"deltas": deltas, "local": local}


class SiteState:
    """A site's own files for one federated run: ``<root>/fedfms_site_state/<run id>/<name>.pt``.

    ``root`` is the site's output folder (its settings' ``output_dir``) or its workspace (the
    startup kit in a deployment), both kept across jobs, so a resumed run (same run id) finds
    what the interrupted one kept.
    """

    def __init__(self, root: str | os.PathLike, run_id: str) -> None:
        self.folder = Path(root) / "fedfms_site_state" / re.sub(r"[^A-Za-z0-9_.-]", "_", str(run_id))

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def load(self, name: str) -> dict | None:
        """The values saved under ``name``, or None before the first save."""
        path = self.path(name)
        if not path.is_file():
            return None
        return load_torch_file(path, "missing", f"this site's saved {name}")

    def save(self, name: str, values: Mapping[str, torch.Tensor]) -> Path:
        path = self.path(name)
        snapshot = {k: torch.as_tensor(v).detach().cpu().clone() for k, v in values.items()}
        atomic_write(path, lambda tmp: torch.save(snapshot, tmp))
        return path
