"""A site's part of FedProx, SCAFFOLD and Ditto on a one-weight network (the simulator runs are in tests/fl/test_algorithms.py)."""

import pytest
import torch
from monai.engines import SupervisedTrainer
from torch import nn

from fedfms.fl.executors.algorithms import ProximalLoss, ScaffoldSteps, SiteState, proximal_training

LR = 0.1


def _network(value: float = 0.0) -> nn.Module:
    network = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        network.weight.fill_(value)
    return network


def _sum(pred, label):  # d loss / d weight = 1 for the input 1
    return pred.sum()


def _trainer(network: nn.Module, steps: int = 1) -> SupervisedTrainer:
    data = [{"image": torch.ones(1, 1), "label": torch.zeros(1, 1)}] * steps
    optimizer = torch.optim.SGD(network.parameters(), lr=LR)
    return SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=network, optimizer=optimizer,
                             loss_function=_sum, prepare_batch=lambda batch, device, non_blocking, **kw: (batch["image"], batch["label"]))


def test_proximal_term_with_mu_zero_changes_nothing_and_otherwise_pulls_toward_the_reference():
    network, pred = _network(3.0), torch.ones(1, 1)
    reference = {"weight": torch.ones(1, 1)}
    for mu, extra in ((0.0, 0.0), (2.0, 4.0)):  # mu / 2 * (3 - 1)^2
        network.zero_grad()
        loss = ProximalLoss(_sum, network, reference, mu)(network(pred), None)
        loss.backward()
        assert float(loss.detach()) == 3.0 + extra
        assert float(network.weight.grad) == 1.0 + mu * 2.0  # the base gradient, plus mu (w - w_ref)


def test_proximal_training_restores_the_bundle_loss():
    network = _network()
    trainer = _trainer(network)
    with proximal_training(trainer, network, {"weight": torch.zeros(1, 1)}, 0.5):
        assert isinstance(trainer.loss_function, ProximalLoss)
    assert trainer.loss_function is _sum


def test_scaffold_corrects_every_step_and_its_controls_become_the_local_gradient():
    network = _network()
    trainer = _trainer(network, steps=2)
    steps = ScaffoldSteps(trainer, network, exchanged={"weight"})
    with steps.correcting({"weight": torch.ones(1, 1)}, None):  # c = 1, c_i = 0 at first
        trainer.run()
    # each step: the gradient (1) and the correction (c - c_i = 1), both times the learning rate
    assert network.weight.item() == pytest.approx(-2 * LR * 2)
    controls = steps.finish({"weight": torch.zeros(1, 1)})
    # c_i+ = c_i - c + (x - y) / (K lr) = 0 - 1 + 0.4 / 0.2 = 1: the local gradient
    assert float(controls["local"]["weight"]) == pytest.approx(1.0) and float(controls["deltas"]["weight"].item()) == pytest.approx(1.0)


def test_scaffold_keeps_no_controls_for_weights_that_do_not_travel():
    network = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    steps = ScaffoldSteps(_trainer(network), network, exchanged={"0.weight"})
    assert steps.controlled() == ["0.weight"]  # FedBN's local layer is trained but not averaged: nothing to correct toward


def test_site_state_is_kept_per_run_and_written_whole(tmp_path):
    state = SiteState(tmp_path, "simulate_job_2026/12/06 17:00")
    assert state.load("controls") is None
    path = state.save("controls", {"w": torch.arange(3.0)})
    assert path.parent == tmp_path / "fedfms_site_state" / "simulate_job_2026_12_06_17_00"
    assert torch.equal(state.load("controls")["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["controls.pt"]  # no temporary file left
    assert SiteState(tmp_path, "another run").load("controls") is None
