"""Parameter-efficient fine-tuning modules inserted into a SAM segmenter.

Medical SAM Adapter (MSA, used by FedMSA): in every ViT block a Space adapter (bottleneck with
skip connection) on the attention output before the residual add, and an MLP adapter (no skip)
beside the MLP on the norm2 output, added with scale 0.5. An optional Depth adapter attends over
the N slices of a stack (``slices`` input mode) and is added to the attention branch. Each adapter
is Linear(D, D/4) -> GELU -> Linear(D/4, D).

LoRA (FLAP-SAM, SAMed): ``W x + s * B A x`` on the query and value projections of the encoder's
fused ``qkv`` and of the decoder's ``q_proj``/``v_proj``. A is ``Linear(in, r)``, B is
``Linear(r, out)``, both without bias. ``init="zero_b"`` (default, FLAP-SAM) zeroes B so the model
starts as the base model; ``init="default"`` keeps PyTorch's Linear initialisation for both.

LiteMedSAM's TinyViT encoder (size ``lite``) gets the same modules in its windowed-attention blocks
(the first, convolutional stage has no attention): a Space adapter on the attention output, an MLP
adapter beside the MLP on its normalised input (TinyViT's MLP holds its own LayerNorm), and LoRA on
q and v of the fused ``qkv`` projection, whose output is laid out per head as (q, k, v).

Both keep the base layers' parameter names (``...attn.qkv.weight``, ``...q_proj.weight``), so
official checkpoints load unchanged; the new parameters are named ``*_Adapter.*`` and ``*.lora_*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from segment_anything.modeling.transformer import Attention as DecoderAttention
from torch import nn

from fedfms.models.litemedsam import LiteImageEncoder, TinyViTAttention, TinyViTBlock, attention_blocks

LORA_INITS = ("zero_b", "default")


class Adapter(nn.Module):
    """MSA bottleneck: Linear(D, D*ratio) -> GELU -> Linear(D*ratio, D), plus x when ``skip``."""

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.skip = skip
        self.D_fc1 = nn.Linear(dim, hidden)  # names as in MSA checkpoints
        self.D_fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.D_fc2(F.gelu(self.D_fc1(x)))
        return x + out if self.skip else out


class MSABlock(nn.Module):
    """A SAM ViT block with MSA adapters; holds the original block's layers under their own names."""

    def __init__(self, block: Block, ratio: float = 0.25, depth_adapter: bool = False, num_slices: int = 1, mlp_scale: float = 0.5):
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size
        self.Space_Adapter = Adapter(dim, ratio, skip=True)
        self.MLP_Adapter = Adapter(dim, ratio, skip=False)
        self.Depth_Adapter = Adapter(dim, ratio, skip=False) if depth_adapter else None
        self.num_slices = num_slices
        self.mlp_scale = mlp_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        h, w = x.shape[1], x.shape[2]
        depth = self._depth_branch(x) if self.Depth_Adapter is not None and self.num_slices > 1 else None
        if self.window_size > 0:
            x, pad_hw = window_partition(x, self.window_size)
        x = self.Space_Adapter(self.attn(x))
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        if depth is not None:
            x = x + depth
        x = shortcut + x
        normed = self.norm2(x)
        return x + self.mlp(normed) + self.mlp_scale * self.MLP_Adapter(normed)

    def _depth_branch(self, x: torch.Tensor) -> torch.Tensor:
        """Attention across the N slices of each stack at every token position, then the Depth adapter."""
        bn, h, w, c = x.shape
        n = self.num_slices
        if bn % n:
            raise ValueError(f"batch of {bn} slices is not a whole number of {n}-slice stacks")
        rows = _grid_rows(n)
        tokens = x.reshape(bn // n, n, h * w, c).transpose(1, 2).reshape(-1, rows, n // rows, c)
        mixed = self.Depth_Adapter(self.attn(tokens))
        return mixed.reshape(bn // n, h * w, n, c).transpose(1, 2).reshape(bn, h, w, c)


def _grid_rows(n: int) -> int:
    """Largest divisor of n not above sqrt(n): the N slices laid out as a near-square grid for 2D attention."""
    return max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)


class TinyViTMSABlock(nn.Module):
    """A TinyViT attention block with MSA Space and MLP adapters; holds the block's layers under their own names."""

    def __init__(self, block: TinyViTBlock, ratio: float = 0.25, mlp_scale: float = 0.5) -> None:
        super().__init__()
        self.attn, self.local_conv, self.mlp = block.attn, block.local_conv, block.mlp
        self.input_resolution, self.window_size = block.input_resolution, block.window_size
        self.Space_Adapter = Adapter(block.dim, ratio, skip=True)
        self.MLP_Adapter = Adapter(block.dim, ratio, skip=False)
        self.mlp_scale = mlp_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, length, c = x.shape
        x = x + self._windowed_attention(x.view(b, h, w, c)).reshape(b, length, c)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, length).transpose(1, 2)
        return x + self.mlp(x) + self.mlp_scale * self.MLP_Adapter(self.mlp.norm(x))

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention (with the Space adapter on its output) in padded windows, as TinyViT's block runs it."""
        hw = (x.shape[1], x.shape[2])
        windows, padded_hw = window_partition(x, self.window_size)
        out = self.Space_Adapter(self.attn(windows.flatten(1, 2)))
        return window_unpartition(out.view_as(windows), self.window_size, padded_hw, hw)


def add_adapters(encoder: nn.Module, ratio: float = 0.25, depth_adapter: bool = False, num_slices: int = 1) -> None:
    """Give every attention block of a SAM (ViT) or LiteMedSAM (TinyViT) image encoder its MSA adapters."""
    if isinstance(encoder, LiteImageEncoder):
        if depth_adapter:
            raise ValueError("the MSA depth adapter is defined for ViT encoders, not LiteMedSAM's TinyViT")
        for layer in encoder.layers[1:]:
            layer.blocks = nn.ModuleList(TinyViTMSABlock(b, ratio) for b in layer.blocks)
        return
    encoder.blocks = nn.ModuleList(MSABlock(b, ratio, depth_adapter, num_slices) for b in encoder.blocks)


def _low_rank(in_features: int, out_features: int, rank: int, init: str) -> tuple[nn.Linear, nn.Linear]:
    if init not in LORA_INITS:
        raise ValueError(f"unknown LoRA init {init!r}; expected one of {', '.join(LORA_INITS)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    a, b = nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=False)
    if init == "zero_b":
        nn.init.zeros_(b.weight)
    return a, b


class LoRAQKV(nn.Linear):
    """SAM's fused qkv projection with LoRA on q and v: qkv(x) + s * [B_q A_q x, 0, B_v A_v x]."""

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0, init: str = "zero_b") -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the frozen base layer, under its own names
        dim = base.out_features // 3
        self.scale = scale
        self.lora_a_q, self.lora_b_q = _low_rank(base.in_features, dim, rank, init)
        self.lora_a_v, self.lora_b_v = _low_rank(base.in_features, dim, rank, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = super().forward(x).chunk(3, dim=-1)
        q = q + self.scale * self.lora_b_q(self.lora_a_q(x))
        v = v + self.scale * self.lora_b_v(self.lora_a_v(x))
        return torch.cat([q, k, v], dim=-1)


class LoRAHeadwiseQKV(nn.Linear):
    """TinyViT's fused qkv projection, laid out per head as (q, k, v), with LoRA on q and v."""

    def __init__(self, base: nn.Linear, attention: TinyViTAttention, rank: int, scale: float = 1.0, init: str = "zero_b") -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.heads, self.split = attention.num_heads, [attention.key_dim, attention.key_dim, attention.d]
        self.scale = scale
        self.lora_a_q, self.lora_b_q = _low_rank(base.in_features, attention.nh_kd, rank, init)
        self.lora_a_v, self.lora_b_v = _low_rank(base.in_features, attention.dh, rank, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = super().forward(x).unflatten(-1, (self.heads, -1)).split(self.split, dim=-1)
        q = q + self.scale * self.lora_b_q(self.lora_a_q(x)).unflatten(-1, (self.heads, -1))
        v = v + self.scale * self.lora_b_v(self.lora_a_v(x)).unflatten(-1, (self.heads, -1))
        return torch.cat([q, k, v], dim=-1).flatten(-2)


class LoRALinear(nn.Linear):
    """A projection with a LoRA update: W x + b + s * B A x."""

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0, init: str = "zero_b") -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.scale = scale
        self.lora_a, self.lora_b = _low_rank(base.in_features, base.out_features, rank, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.scale * self.lora_b(self.lora_a(x))


def add_lora(model: nn.Module, rank: int = 32, scale: float = 1.0, init: str = "zero_b", encoder: bool = True, decoder: bool = True) -> None:
    """Put LoRA on q and v of every attention layer of the image encoder and/or mask decoder."""
    if encoder and isinstance(model.image_encoder, LiteImageEncoder):
        for block in attention_blocks(model.image_encoder):
            block.attn.qkv = LoRAHeadwiseQKV(block.attn.qkv, block.attn, rank, scale, init)
    elif encoder:
        for block in model.image_encoder.blocks:
            block.attn.qkv = LoRAQKV(block.attn.qkv, rank, scale, init)
    if decoder:
        attentions = [m for m in model.mask_decoder.transformer.modules() if isinstance(m, DecoderAttention)]
        for attention in attentions:
            attention.q_proj = LoRALinear(attention.q_proj, rank, scale, init)
            attention.v_proj = LoRALinear(attention.v_proj, rank, scale, init)
