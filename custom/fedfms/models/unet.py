"""Convolutional 2D segmentation networks: the U-Net baselines and the SM-lite student.

Every network is a MONAI network used as its authors intend; this module only chooses the
settings each paper calls for and wraps the result in :class:`~fedfms.models.inputs.StackInput`.

Names and the setting each one reproduces:

``unet``       FedU-Net, the U-Net baseline of FedFMS: MONAI ``UNet`` with channels 32..512, four
               stride-2 levels, two residual units per level and batch norm.
``basicunet``  MONAI ``BasicUNet`` at its default width (32, 32, 64, 128, 256, 32): the plain
               two-convolutions-per-level U-Net. No paper names it; it is the full-width
               reference for ``smlite``, which has the same architecture at half the width.
``dynunet``    FednnU-Net, the nnU-Net baseline of FedFMS: MONAI ``DynUNet`` configured by a 2D
               nnU-Net plan derived from the image size (:func:`nnunet_plan`): 3x3 kernels,
               stride 1 then 2, filters 32 doubling up to 512, instance norm, plain (non-residual)
               blocks and no deep supervision.
``smlite``     SM-lite, the student of FM-instructed initialisation (``fm_instructed_init``): a
               compact ``BasicUNet`` distilled from a frozen SAM-Med2D teacher on the server's
               proxy set and then federated with FedAvg. The paper says only that it is a small
               U-Net; the width (16, 16, 32, 64, 128, 16) is our choice (see :data:`SMLITE_FEATURES`).

Input modes (``input_mode``, see :mod:`fedfms.models.inputs`): a batch of N-slice stacks
(B, N, H, W) is fed either as N channels (``channels``: the network has N input channels and
returns (B, C, H, W)) or as B*N one-channel images (``slices``: the network has 1 input channel
and returns (B*N, C, H, W), one prediction per slice).

Outputs are logits: no sigmoid or softmax is applied, so losses and post-processing choose the
activation (BCE/Dice with logits, the KL term of distillation, thresholding at inference).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple

from monai.networks.nets import BasicUNet, DynUNet, UNet
from torch import nn

from fedfms.models.inputs import INPUT_MODES, StackInput

UNET_NAMES = ("unet", "basicunet", "dynunet", "smlite")

# FedU-Net: MONAI's residual UNet layout (two residual units per level, batch norm), 32..512 channels.
FEDUNET_SETTINGS: dict[str, Any] = {
    "channels": (32, 64, 128, 256, 512),
    "strides": (2, 2, 2, 2),
    "num_res_units": 2,
    "norm": "batch",
}

BASICUNET_FEATURES = (32, 32, 64, 128, 256, 32)

# Half the BasicUNet width: about 0.5M parameters (a quarter of BasicUNet, a thirteenth of
# FedU-Net), so each FedAvg round moves ~2 MB per client, and a student small enough that
# distillation from the 271M-parameter SAM-Med2D teacher is a real compression.
SMLITE_FEATURES = (16, 16, 32, 64, 128, 16)

# Set by build_unet itself: 2D networks, with channels from its own arguments.
_FIXED_KEYWORDS = ("spatial_dims", "in_channels", "out_channels")


class NnUNetPlan(NamedTuple):
    """Per-level DynUNet settings: one entry per resolution level, top level first."""

    kernels: list[int]
    strides: list[int]
    filters: list[int]


def _check_divisible(image_size: int, total_stride: int, what: str) -> None:
    """Stride-2 encoders need sizes divisible by their total stride, or skip connections misalign."""
    if image_size % total_stride:
        lower = image_size // total_stride * total_stride
        candidates = sorted({max(lower, total_stride), lower + total_stride})
        nearest = " or ".join(map(str, candidates))
        raise ValueError(
            f"image_size {image_size} is not divisible by the total stride {total_stride} of {what}; "
            f"use a multiple of {total_stride}, e.g. {nearest}"
        )


def nnunet_plan(image_size: int, min_feature_size: int = 4, max_levels: int = 6) -> NnUNetPlan:
    """The 2D nnU-Net network plan for square ``image_size`` inputs.

    As nnU-Net's planner: 3x3 kernels everywhere; the first level keeps full resolution (stride 1)
    and each further level halves it (stride 2) as long as the feature map stays at least
    ``min_feature_size`` pixels wide, with at most ``max_levels`` downsamplings; filters start
    at 32 and double per level, capped at 512 (nnU-Net's 2D cap). nnU-Net pads patches to a
    multiple of the total stride; here the images are prepared at a fixed size, so a size that
    is not a multiple is an error instead.

    >>> nnunet_plan(224).strides
    [1, 2, 2, 2, 2, 2]
    """
    if min_feature_size < 1 or max_levels < 2:
        raise ValueError(
            f"need min_feature_size >= 1 and max_levels >= 2, got {min_feature_size} and {max_levels}"
        )
    levels = 0
    while levels < max_levels and image_size >= min_feature_size * 2 ** (levels + 1):
        levels += 1
    if levels < 2:  # DynUNet needs at least three resolution levels
        raise ValueError(
            f"image_size {image_size} is too small for an nnU-Net plan: two downsamplings need at "
            f"least {4 * min_feature_size} pixels with min_feature_size {min_feature_size}"
        )
    _check_divisible(image_size, 2**levels, f"the nnU-Net plan ({levels} downsamplings)")
    return NnUNetPlan(
        kernels=[3] * (levels + 1),
        strides=[1] + [2] * levels,
        filters=[min(32 * 2**level, 512) for level in range(levels + 1)],
    )


def _architecture(name: str, image_size: int | None) -> tuple[type[nn.Module], dict[str, Any]]:
    """The MONAI class for ``name`` and its default keyword arguments (besides the fixed ones)."""
    if name == "unet":
        if image_size is not None:
            _check_divisible(image_size, math.prod(FEDUNET_SETTINGS["strides"]), "FedU-Net")
        return UNet, dict(FEDUNET_SETTINGS)
    if name == "basicunet":
        return BasicUNet, {"features": BASICUNET_FEATURES}
    if name == "smlite":
        return BasicUNet, {"features": SMLITE_FEATURES}
    if name == "dynunet":
        if image_size is None:
            raise ValueError("dynunet derives its nnU-Net plan from the image size: pass image_size")
        plan = nnunet_plan(image_size)
        return DynUNet, {
            "kernel_size": plan.kernels,
            "strides": plan.strides,
            "upsample_kernel_size": plan.strides[1:],
            "filters": plan.filters,
            "norm_name": ("INSTANCE", {"affine": True}),
            "deep_supervision": False,
            "res_block": False,
        }
    raise ValueError(f"unknown network {name!r}; expected one of {', '.join(UNET_NAMES)}")


def _check_overrides(name: str, network_class: type[nn.Module], overrides: dict[str, Any]) -> None:
    """Reject keywords the MONAI class does not take, naming the network, instead of a bare TypeError."""
    fixed = sorted(set(overrides) & set(_FIXED_KEYWORDS))
    if fixed:
        raise ValueError(
            f"{name}: {', '.join(fixed)} cannot be overridden; networks are 2D and their channels "
            "come from the in_channels/out_channels/num_slices/input_mode arguments"
        )
    accepted = inspect.signature(network_class).parameters
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        allowed = ", ".join(key for key in accepted if key not in _FIXED_KEYWORDS)
        raise ValueError(
            f"{name} ({network_class.__name__}) has no setting {', '.join(map(repr, unknown))}; "
            f"it accepts {allowed}"
        )


def _check_channels(in_channels: int, input_mode: str, num_slices: int) -> None:
    """``in_channels`` is what one network input has, so it must agree with how stacks are fed."""
    if input_mode not in INPUT_MODES:
        raise ValueError(f"unknown input mode {input_mode!r}; expected one of {', '.join(INPUT_MODES)}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be at least 1, got {num_slices}")
    expected = num_slices if input_mode == "channels" else 1
    if in_channels != expected:
        why = (
            f"input_mode 'channels' feeds the {num_slices} slices of a stack as channels"
            if input_mode == "channels"
            else "input_mode 'slices' feeds every slice as its own one-channel image"
        )
        raise ValueError(f"{why}, so in_channels must be {expected}, got {in_channels}")


def build_unet(
    name: str,
    in_channels: int = 1,
    out_channels: int = 1,
    *,
    image_size: int | None = None,
    input_mode: str = "channels",
    num_slices: int = 1,
    **overrides: Any,
) -> nn.Module:
    """Build the 2D network ``name`` (one of :data:`UNET_NAMES`) fed by (B, N, H, W) stacks.

    ``in_channels`` is the channel count of one network input: it must equal ``num_slices`` in
    ``channels`` mode and be 1 in ``slices`` mode (checked, so a config that changes the stack
    size without the channel count fails here rather than at the first batch). ``image_size`` is
    required by ``dynunet`` (its plan depends on it) and, when given, checked against FedU-Net's
    total stride. ``overrides`` replace keyword arguments of the MONAI class (e.g.
    ``channels=(16, 32, 64)`` for a small ``unet`` in tests). Returns ``StackInput(network,
    input_mode)``, whose output is logits.
    """
    network_class, settings = _architecture(name, image_size)
    _check_overrides(name, network_class, overrides)
    _check_channels(in_channels, input_mode, num_slices)
    network = network_class(
        spatial_dims=2, in_channels=in_channels, out_channels=out_channels, **(settings | overrides)
    )
    return StackInput(network, input_mode)
