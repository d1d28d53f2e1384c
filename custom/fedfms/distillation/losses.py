"""The FM-instructed-initialisation loss: distillation from a teacher's logits plus Dice on the label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


def bernoulli_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL(sigmoid(teacher) || sigmoid(student)) of two Bernoulli distributions, in nats.

    With p = sigmoid(teacher) and q = sigmoid(student): p log(p/q) + (1-p) log((1-p)/(1-q)), computed
    from logits as the cross-entropy of q against p minus the entropy of p, which stays finite for
    the saturated logits a confident teacher gives.
    """
    p = torch.sigmoid(teacher_logits)
    cross_entropy = F.binary_cross_entropy_with_logits(student_logits, p, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, p, reduction="none")
    return cross_entropy - entropy


class DistillationLoss(nn.Module):
    """``alpha * KL(sigmoid(teacher) || sigmoid(student)) + (1 - alpha) * Dice(label, sigmoid(student))``.

    The loss of FM-instructed initialisation (alpha 0.6 in the paper). The KL term is the per-pixel
    Bernoulli KL (:func:`bernoulli_kl`) averaged over every pixel of the batch; the Dice term is
    MONAI's ``DiceLoss(sigmoid=True, batch=True)``: one Dice over the whole batch, so slices
    without foreground (half of a prostate volume) do not each count as a separate all-or-nothing
    term. ``alpha=0`` is supervised pre-training on the same data (Dice only).

    Args of ``forward``:
        input: student logits (B, 1, H, W).
        target: (B, 2, H, W), channel 0 the binary label and channel 1 the teacher's logits; with
            ``alpha=0`` the label alone (B, 1, H, W) is enough.
    """

    def __init__(self, alpha: float = 0.6) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.dice = DiceLoss(sigmoid=True, batch=True)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape[1] != 1:
            raise ValueError(f"the distillation loss needs a 1-channel (sigmoid) student, got {input.shape[1]} channels")
        if self.alpha > 0 and target.shape[1] != 2:
            raise ValueError(f"with alpha > 0 the target must hold the label and the teacher's logits (2 channels), got {target.shape[1]}")
        loss = (1.0 - self.alpha) * self.dice(input, target[:, :1])
        if self.alpha > 0:
            loss = loss + self.alpha * bernoulli_kl(target[:, 1:2], input).mean()
        return loss
