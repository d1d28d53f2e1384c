"""Fine-tuning strategies: which parameters train and travel, each defined by one rule on names.

| strategy   | paper                       | trainable                                               |
|------------|-----------------------------|---------------------------------------------------------|
| ``full``     | FedSAM, FullFT              | everything                                              |
| ``msa``      | FedMSA                      | MSA adapters + the whole mask decoder                   |
| ``flap``     | FLAP-SAM                    | LoRA + decoder output layers (UP, HYP) + mask tokens    |
| ``lora``     | LoRAFT                      | LoRA                                                    |
| ``lora_dec`` | LoRADecFT (SAMed)           | LoRA + the whole mask decoder                           |
| ``dec``      | DecFT                       | the whole mask decoder                                  |
| ``pdec``     | PDecFT                      | decoder output layers (UP, HYP) + mask tokens           |
| ``attn``     | AttnFT                      | every attention layer of the encoder and the decoder    |

The rules are the same for LiteMedSAM (size ``lite``): its attention layers are those of TinyViT's
windowed-attention stages (``image_encoder.layers.N.blocks.M.attn``). A newly initialised head
(the FedFMS 1x1 conv) trains under every strategy. ``attn`` counts the
attention layers only, which reproduces FLAP-SAM Table 1 (29.575M for ViT-B at 224); the FLAP-SAM
training script also unfreezes the decoder output layers for AttnFT, which Table 1 does not count.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

_DECODER_ATTENTION = re.compile(
    r"^mask_decoder\.transformer\.(layers\.\d+\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)|final_attn_token_to_image)\."
)
_ENCODER_ATTENTION = re.compile(r"^image_encoder\.(layers\.\d+\.)?blocks\.\d+\.attn\.")  # ViT, or TinyViT stages
_DECODER_OUTPUT = ("mask_decoder.output_upscaling.", "mask_decoder.output_hypernetworks_mlps.", "mask_decoder.mask_tokens.")


def is_lora(name: str) -> bool:
    return ".lora_" in name


def is_adapter(name: str) -> bool:
    return "_Adapter." in name


def is_decoder(name: str) -> bool:
    return name.startswith("mask_decoder.") and not is_lora(name)


def is_decoder_output(name: str) -> bool:
    return name.startswith(_DECODER_OUTPUT)


def is_attention(name: str) -> bool:
    return not is_lora(name) and bool(_ENCODER_ATTENTION.match(name) or _DECODER_ATTENTION.match(name))


def is_head(name: str) -> bool:
    return name.startswith("head.")


@dataclass(frozen=True)
class Strategy:
    """A named set of trainable parameters and the PEFT modules it needs in the model."""

    name: str
    description: str
    rule: Callable[[str], bool]
    needs: str | None = None  # "lora", "adapters" or None

    def trains(self, name: str) -> bool:
        return is_head(name) or self.rule(name)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("full", "FedSAM / FullFT: every parameter", lambda n: True),
        Strategy("msa", "FedMSA: MSA adapters + mask decoder", lambda n: is_adapter(n) or is_decoder(n), "adapters"),
        Strategy("flap", "FLAP-SAM: LoRA + decoder UP + HYP + mask tokens", lambda n: is_lora(n) or is_decoder_output(n), "lora"),
        Strategy("lora", "LoRAFT: LoRA only", is_lora, "lora"),
        Strategy("lora_dec", "LoRADecFT (SAMed): LoRA + mask decoder", lambda n: is_lora(n) or is_decoder(n), "lora"),
        Strategy("dec", "DecFT: mask decoder", is_decoder),
        Strategy("pdec", "PDecFT: decoder UP + HYP + mask tokens", is_decoder_output),
        Strategy("attn", "AttnFT: attention layers of encoder and decoder", is_attention),
    )
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def trainable_names(model: nn.Module, strategy: str) -> list[str]:
    """Names of the parameters ``strategy`` trains in ``model`` (the rule, applied; nothing else)."""
    rule = get_strategy(strategy)
    return [name for name, _ in model.named_parameters() if rule.trains(name)]


def apply_strategy(model: nn.Module, strategy: str) -> list[str]:
    """Freeze every parameter except the strategy's; return the trainable names."""
    names = set(trainable_names(model, strategy))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    return [n for n, _ in model.named_parameters() if n in names]
