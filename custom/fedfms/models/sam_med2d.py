"""Promptable SAM and SAM-Med2D built from ``segment_anything``'s own modeling classes.

SAM-Med2D (Cheng et al. 2023, OpenGVLab/SAM-Med2D) is SAM ViT-B fine-tuned on medical images at a
256 input (ImageNet-normalised 0-255 RGB, resized without padding) with one extra adapter in every
image-encoder block. The structure below was read from the public code; the implementation is ours.

Adapter (``image_encoder.blocks.N.Adapter``), on a block's ``norm2`` output h, channels D:
    gate = Sigmoid(Linear(D/4 -> D, no bias)(ReLU(Linear(D -> D/4, no bias)(mean over H, W of h))))
    s    = ReLU(ConvTranspose2d(D, D, 4, stride 2, pad 1, no bias)(ReLU(Conv2d(D, D, 3, stride 2, pad 1, no bias)(gate * h))))
    out  = LayerNorm(D)(h + s)
    block: x = x + attention(norm1(x)); x = x + mlp(norm2(x)) + Adapter(norm2(x))
Keys: ``Adapter.channel.0/2.weight`` (gate), ``Adapter.spatial.0/2.weight`` (convs),
``Adapter.norm.weight/bias``. The stride-2 conv halves the token grid and the transposed conv
doubles it back, so the grid (image size / patch size) must be even.

Parameter count of ``build_sam_med2d("vit_b")`` (256 input), checked by the tests:
    SAM ViT-B at 1024                                   93,735,472
    - pos_embed 64x64 -> 16x16 grid (x768)             -2,949,120
    - rel-pos tables of the 4 global blocks 127 -> 31 rows (x64 x2 x4)  -49,152
    = SAM ViT-B at 256                                  90,737,200
    + 12 adapters x 15,042,048 (LayerNorm 1,536, gate 2x768x192 = 294,912,
      conv 768x768x3x3 = 5,308,416, transposed conv 768x768x4x4 = 9,437,184)   180,504,576
    = 271,241,776, the "271.2M" SAM-Med2D reports.

Both builders return ``segment_anything``'s :class:`Sam` (``image_encoder``, ``prompt_encoder``,
``mask_decoder`` with 3 multimask outputs), so official SAM and SAM-Med2D state dicts load by name
with :func:`fedfms.models.checkpoints.load_checkpoint`.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from torch import nn

from fedfms.models.sam import build_image_encoder, build_prompt_encoder, build_two_way_transformer, sam_size

ADAPTER_RATIO = 0.25  # gate bottleneck: D -> D/4 -> D


class SamMed2DAdapter(nn.Module):
    """SAM-Med2D's adapter on (B, H, W, D) tokens: channel gate, stride-2 conv, transposed conv, LayerNorm.

    The gate re-weights channels from the image-wide average; the conv pair mixes each token with
    its neighbours at half resolution, which the plain ViT block (attention + per-token MLP) does
    not do; the residual keeps the input and the LayerNorm rescales the sum.
    """

    def __init__(self, dim: int, ratio: float = ADAPTER_RATIO) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.norm = nn.LayerNorm(dim)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.Sigmoid()
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )
        # He init for the ReLU layers, as SAM-Med2D initialises them (relevant when training from SAM).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # (B, D, H, W)
        gate = self.channel(x.mean(dim=(2, 3)))[:, :, None, None]
        x = x + self.spatial(gate * x)
        return self.norm(x.permute(0, 2, 3, 1))


class SamMed2DBlock(Block):
    """SAM's ViT block with SAM-Med2D's adapter added beside the MLP.

    Made from a :class:`Block` that :func:`~fedfms.models.sam.build_image_encoder` built, whose
    layers it takes over: the configuration stays SAM's own, base keys stay ``norm1``, ``attn``,
    ``norm2``, ``mlp``, and the adapter is registered after them as ``Adapter``, as in the
    official checkpoints.
    """

    def __init__(self, block: Block, adapter_ratio: float = ADAPTER_RATIO) -> None:
        nn.Module.__init__(self)  # not Block.__init__: the layers are ``block``'s, not new ones
        self.norm1 = block.norm1
        self.attn = block.attn
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.window_size = block.window_size
        self.Adapter = SamMed2DAdapter(block.norm1.normalized_shape[0], adapter_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(self.norm1(x))
        h = self.norm2(x)
        return x + self.mlp(h) + self.Adapter(h)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """SAM's attention step: global, or within non-overlapping windows."""
        if self.window_size == 0:
            return self.attn(x)
        hw = (x.shape[1], x.shape[2])
        windows, padded_hw = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, padded_hw, hw)


def build_prompt_sam(size: str = "vit_b", image_size: int = 1024, *, adapters: bool = False, **size_overrides) -> Sam:
    """Promptable SAM (points, boxes, masks) of a :data:`~fedfms.models.sam.SAM_SIZES` size.

    ``adapters=True`` adds SAM-Med2D's adapter to every encoder block (see the module docstring).
    The mask decoder is SAM's standard one: 3 multimask outputs plus the single-mask token.
    """
    arch = sam_size(size, **size_overrides)
    encoder = build_image_encoder(arch, image_size)
    if adapters:
        grid = image_size // arch.patch_size
        if grid % 2:
            raise ValueError(
                f"SAM-Med2D's adapter halves and re-doubles the token grid, which must be even; "
                f"image size {image_size} / patch {arch.patch_size} = {grid}"
            )
        for i, block in enumerate(encoder.blocks):
            encoder.blocks[i] = SamMed2DBlock(block)
    decoder = MaskDecoder(transformer_dim=arch.prompt_dim, transformer=build_two_way_transformer(arch), num_multimask_outputs=3)
    return Sam(image_encoder=encoder, prompt_encoder=build_prompt_encoder(arch, image_size), mask_decoder=decoder)


def build_sam_med2d(size: str = "vit_b", image_size: int = 256, **size_overrides) -> Sam:
    """SAM-Med2D: ``vit_b`` at 256 is the published model (271,241,776 parameters, "271.2M").

    ``tiny`` and ``small`` build the same structure narrow and shallow for CPU tests and demos.
    """
    return build_prompt_sam(size, image_size, adapters=True, **size_overrides)
