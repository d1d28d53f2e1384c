"""FedOpt's server optimisers and the early-stopping rule, on hand-made values (simulator runs: tests/fl/test_algorithms.py)."""

import pytest
import torch

from fedfms.fl.checks.updates import UpdateValidator
from fedfms.fl.workflows.fedavg import ResumableFedAvg
from fedfms.fl.workflows.fedopt import Yogi, server_optimizer_args


def test_yogi_follows_reddi_et_al_algorithm_2():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = Yogi([weight], lr=0.1, betas=(0.9, 0.99), eps=1e-3, initial_accumulator=1e-6)
    m, v, x = torch.zeros(2), torch.full((2,), 1e-6), weight.detach().clone()
    for grad in (torch.tensor([0.5, -1.0]), torch.tensor([-0.2, 3.0])):
        weight.grad = grad.clone()
        optimizer.step()
        m = 0.9 * m + 0.1 * grad
        v = v - 0.01 * grad**2 * torch.sign(v - grad**2)
        x = x - 0.1 * m / (v.sqrt() + 1e-3)
        torch.testing.assert_close(weight.detach(), x)
    state = optimizer.state_dict()  # what a resumed server restores
    again = Yogi([torch.nn.Parameter(weight.detach().clone())], lr=0.1)
    again.load_state_dict(state)
    torch.testing.assert_close(again.state[again.param_groups[0]["params"][0]]["exp_avg_sq"], v)


@pytest.mark.parametrize("args, message", [
    (("rmsprop",), "unknown server optimiser 'rmsprop'; choose from sgd, adam, yogi"),
    (("sgd", 0.0), "the server optimiser needs lr > 0 and momentum in [0, 1)"),
    (("adam", 0.1, 1.0), "the server optimiser needs lr > 0 and momentum in [0, 1)"),
])
def test_bad_server_optimisers_are_refused(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        server_optimizer_args(*args)


def test_patience_counts_rounds_without_a_better_mean_validation_dice():
    controller = ResumableFedAvg(num_rounds=10, patience=2, persistor_id="")
    controller.validator = UpdateValidator()
    stops = []
    for controller.current_round, score in enumerate([0.2, 0.5, 0.5, 0.6, 0.4, 0.59]):
        stops.append(controller._no_improvement(score))
    assert stops[:5] == [None] * 5  # 0.5 ties (no improvement, 1 of 2), 0.6 improves, 0.4 is 1 of 2
    assert "has not improved on 0.6000 (the model sent in round 3) for 2 rounds (patience); 6 of 10 rounds ran" in stops[5]
    assert controller.server_state()["early_stopping_state"] == {"best": {"round": 3, "score": 0.6}, "rounds_without_improvement": 2}
    assert ResumableFedAvg(num_rounds=3, persistor_id="")._no_improvement(0.1) is None  # no patience: every round runs


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_patience_must_be_a_whole_number_of_rounds(patience):
    with pytest.raises(ValueError, match="patience must be a whole number of rounds >= 1"):
        ResumableFedAvg(num_rounds=3, patience=patience, persistor_id="")
