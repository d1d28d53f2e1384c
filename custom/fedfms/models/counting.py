"""Parameter accounting: totals, trainable counts, per-component counts and bytes per round."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from fedfms.models.strategies import is_adapter, is_decoder_output, is_head, is_lora

FP32_BYTES = 4


@dataclass(frozen=True)
class ParameterCount:
    total: int
    trainable: int

    @property
    def bytes_per_round(self) -> int:
        """Bytes of the trainable parameters in fp32: what one client sends per round."""
        return self.trainable * FP32_BYTES


def count_parameters(model: nn.Module) -> ParameterCount:
    parameters = list(model.parameters())
    return ParameterCount(sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad))


def component(name: str) -> str:
    """The part of a SAM segmenter a parameter belongs to, for reports."""
    if is_lora(name):
        return "lora (encoder)" if name.startswith("image_encoder.") else "lora (decoder)"
    if is_adapter(name):
        return "adapters"
    if is_head(name):
        return "head"
    if is_decoder_output(name):
        return "decoder output (UP, HYP, mask tokens)"
    return name.split(".", 1)[0]


def component_counts(model: nn.Module) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for name, parameter in model.named_parameters():
        counts[component(name)] += parameter.numel()
    return dict(counts)
