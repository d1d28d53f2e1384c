"""The FM-instructed-init loss against a computation by hand."""

import math

import pytest
import torch

from fedfms.distillation import DistillationLoss, bernoulli_kl

STUDENT = [[0.0, 2.0], [-1.0, 0.5]]
TEACHER = [[3.0, -2.0], [-1.0, 20.0]]
LABEL = [[1.0, 0.0], [0.0, 1.0]]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _hand_kl() -> float:
    """Mean over pixels of p log(p/q) + (1-p) log((1-p)/(1-q)), p = sigmoid(teacher), q = sigmoid(student)."""
    terms = []
    for s, t in zip(sum(STUDENT, []), sum(TEACHER, [])):
        p, q = _sigmoid(t), _sigmoid(s)
        terms.append(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    return sum(terms) / len(terms)


def _hand_dice() -> float:
    """MONAI's batch Dice loss with its default smoothing: 1 - (2 sum(qy) + 1e-5) / (sum(q) + sum(y) + 1e-5)."""
    q = [_sigmoid(s) for s in sum(STUDENT, [])]
    y = sum(LABEL, [])
    return 1 - (2 * sum(a * b for a, b in zip(q, y)) + 1e-5) / (sum(q) + sum(y) + 1e-5)


def _tensors():
    student = torch.tensor(STUDENT, dtype=torch.float64).view(1, 1, 2, 2)
    target = torch.stack([torch.tensor(LABEL), torch.tensor(TEACHER)]).double().view(1, 2, 2, 2)
    return student, target


@pytest.mark.parametrize("alpha", [0.6, 0.0, 1.0])
def test_loss_equals_the_hand_computation(alpha):
    student, target = _tensors()
    expected = alpha * _hand_kl() + (1 - alpha) * _hand_dice()
    assert DistillationLoss(alpha)(student, target).item() == pytest.approx(expected, rel=1e-9)


def test_supervised_pretraining_needs_only_the_label():
    student, target = _tensors()
    assert DistillationLoss(0.0)(student, target[:, :1]).item() == pytest.approx(_hand_dice(), rel=1e-9)
    with pytest.raises(ValueError, match="label and the teacher's logits"):
        DistillationLoss(0.6)(student, target[:, :1])
    with pytest.raises(ValueError, match="1-channel"):
        DistillationLoss(0.6)(student.expand(1, 2, 2, 2), target)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(1.5)


def test_kl_is_zero_for_agreement_and_finite_for_saturated_logits():
    logits = torch.tensor([-20.0, -3.0, 0.0, 4.0, 20.0])
    assert torch.allclose(bernoulli_kl(logits, logits), torch.zeros(5), atol=1e-6)
    disagree = bernoulli_kl(torch.tensor([-20.0, 20.0]), torch.tensor([20.0, -20.0]))
    assert torch.isfinite(disagree).all() and (disagree > 19).all()  # about 20 nats each way


def test_gradient_pulls_the_student_towards_the_teacher():
    student = torch.zeros(1, 1, 4, 4, requires_grad=True)
    target = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 5.0)])[None]  # empty label, confident teacher
    DistillationLoss(1.0)(student, target).backward()
    assert (student.grad < 0).all()  # descending raises the student's logits towards the teacher's
