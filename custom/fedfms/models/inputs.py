"""How a prepared N-slice stack is fed to a 2D network.

Prepared samples are stacks of N consecutive slices, (B, N, H, W) after batching. Two conventions:

``channels``: the stack is the channel axis (FedFMS with N = 1, 2.5D U-Nets); the network sees
    (B, N, H, W) and returns (B, C, H, W).
``slices``:   every slice is its own batch item (FLAP-SAM): the network sees (B*N, 1, H, W) and
    returns (B*N, C, H, W), one prediction per slice, to be compared with the label of each
    slice (prepared with ``--all-label-slices``); see :func:`slices_to_batch`.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_MODES = ("channels", "slices")


def slices_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) -> (B*N, 1, H, W): slice k of sample b becomes item b*N + k."""
    if x.ndim != 4:
        raise ValueError(f"expected a batch of stacks (B, N, H, W), got shape {tuple(x.shape)}")
    b, n, h, w = x.shape
    return x.reshape(b * n, 1, h, w)


class StackInput(nn.Module):
    """Feed (B, N, H, W) stacks to ``network`` as channels or as batch items (see module docstring)."""

    def __init__(self, network: nn.Module, mode: str = "channels") -> None:
        super().__init__()
        if mode not in INPUT_MODES:
            raise ValueError(f"unknown input mode {mode!r}; expected one of {', '.join(INPUT_MODES)}")
        self.network = network
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "slices":
            x = slices_to_batch(x)
        return self.network(x)
