"""Inference of 2D slice networks on whole 3D volumes, and mixed-precision inference on CPUs.

Training feeds the networks N-slice stacks cut from volumes whose slices were resized to S x S
(:mod:`fedfms.transforms.slicing`, :func:`fedfms.data.prepare.slice_transform`). Evaluation and
inference bundles load whole volumes, so :class:`SliceInferer` rebuilds exactly those stacks from
each volume, runs the network on them and puts the per-slice logits back into a volume at the
input's resolution. MONAI's own ``monai.inferers.SliceInferer`` cannot do this: it runs 2D sliding
windows on single slices at their native size, without stacks or resizing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from monai.utils import convert_data_type, convert_to_dst_type

from fedfms.models.inputs import INPUT_MODES
from fedfms.transforms.slicing import stack_indices


class SliceInferer(Inferer):
    """Run a 2D network over every slice of (B, 1, H, W, D) volumes and return (B, C, H, W, D) logits.

    Per volume, the depth axis becomes the channel axis and all slices are resized to
    ``image_size`` in one bilinear call (``DepthToChanneld`` + MONAI ``Resize``, as in prepare);
    stack ``k`` holds the slices :func:`~fedfms.transforms.slicing.stack_indices` gives for slice
    ``k`` (edges replicated). The network sees ``batch_size`` stacks at a time, (k, N, S, S):

    ``channels``: it returns (k, C, h, w), one prediction for each stack's centre slice.
    ``slices``: it returns (k*N, C, h, w), a prediction for every slice of every stack. A slice is
        predicted by every window that contains it, so its logits are the mean over those windows.
        Windows reaching past either end contain the replicated first/last slice, and their
        predictions for those positions count towards slice 0 / D-1 (the sum is indexed by
        ``stack_indices``), as in training where each such position is supervised by that slice.

    Per-slice logits (h may be below S, e.g. S/4 for the FedFMS decoder) are resized back to
    (H, W) in one bilinear call. The network runs under the caller's grad mode (wrap the call in
    ``torch.no_grad()`` for inference). A MetaTensor input gives a MetaTensor output with the
    input's metadata, as ``SlidingWindowInferer`` does, so ``Invertd``/``SaveImaged`` apply.

    Args:
        image_size: the network's input height and width S (the prepare ``image_size``).
        num_slices: stack size N, odd; the same as in training.
        input_mode: ``channels`` or ``slices`` (:mod:`fedfms.models.inputs`); the same as the network's.
        batch_size: stacks per forward pass; bounds memory, does not change the result.
    """

    def __init__(self, image_size: int, num_slices: int = 1, input_mode: str = "channels", batch_size: int = 8) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        stack_indices(1, num_slices)  # validates num_slices
        if input_mode not in INPUT_MODES:
            raise ValueError(f"unknown input mode {input_mode!r}; expected one of {', '.join(INPUT_MODES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.image_size = image_size
        self.num_slices = num_slices
        self.input_mode = input_mode
        self.batch_size = batch_size

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits (B, C, H, W, D) of ``inputs`` (B, 1, H, W, D); ``args``/``kwargs`` go to ``network``."""
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"expected single-channel volumes (B, 1, H, W, D), got shape {tuple(inputs.shape)}")
        meta = MetaTensor([]).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else None
        volumes = convert_data_type(inputs, torch.Tensor)[0]
        output = torch.stack([self._infer_volume(volume[0], network, *args, **kwargs) for volume in volumes])
        if meta is None:
            return output
        return convert_to_dst_type(output, meta, dtype=output.dtype, device=output.device)[0]

    def _infer_volume(self, volume: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """(H, W, D) volume -> (C, H, W, D) logits."""
        height, width, depth = volume.shape
        size = (self.image_size, self.image_size)
        # float32 like MONAI Resize's default dtype; depth as channels: one interpolation for all slices
        slices = F.interpolate(volume.movedim(-1, 0)[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        logits = self._slice_logits(slices, network, *args, **kwargs)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits.movedim(0, -1)

    def _slice_logits(self, slices: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """(D, S, S) resized slices -> (D, C, h, w) logits, averaged over windows in ``slices`` mode.

        Every chunk's outputs are summed into their slices with one ``index_add_``: the target of
        an output is its stack's centre slice (``channels``) or its slice index (``slices``).
        """
        depth = slices.shape[0]
        index = torch.as_tensor(stack_indices(depth, self.num_slices), device=slices.device)
        per_stack = 1 if self.input_mode == "channels" else self.num_slices
        targets = index[:, self.num_slices // 2 : self.num_slices // 2 + 1] if per_stack == 1 else index
        total: torch.Tensor | None = None
        for start in range(0, depth, self.batch_size):
            rows = index[start : start + self.batch_size]
            out = network(slices[rows], *args, **kwargs)
            expected = len(rows) * per_stack
            if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != expected:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"in {self.input_mode!r} mode the network must return {expected} predictions (B, C, h, w) "
                    f"for {len(rows)} stacks of {self.num_slices} slices, got {shape}"
                )
            if total is None:
                total = out.new_zeros(depth, *out.shape[1:])
            total.index_add_(0, targets[start : start + self.batch_size].flatten().to(out.device), out)
        counts = torch.bincount(targets.flatten(), minlength=depth).to(total.device, total.dtype)
        return total / counts.view(-1, 1, 1, 1)


class AutocastInferer(Inferer):
    """MONAI's ``SimpleInferer`` under ``torch.autocast``: reduced-precision kernels, float32 logits out.

    The bundles' ``amp`` option uses it on CPUs (bf16: native on CPUs with AVX512-BF16 or AMX);
    on GPUs MONAI's own ``amp`` of its trainer and evaluator applies (fp16 with a gradient scaler),
    because MONAI's engines autocast only on CUDA. bf16 keeps float32's exponent range, so no
    gradient scaling is needed; the loss is computed on float32 logits.

    Args:
        dtype: ``bfloat16`` (default) or ``float16``.
    """

    DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

    def __init__(self, dtype: str = "bfloat16") -> None:
        super().__init__()
        if dtype not in self.DTYPES:
            raise ValueError(f"unknown autocast dtype {dtype!r}; expected one of {', '.join(self.DTYPES)}")
        self.dtype = self.DTYPES[dtype]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(inputs.device.type, dtype=self.dtype):
            out = network(inputs, *args, **kwargs)
        return out.float()


def training_inferer(amp: bool, device: torch.device | str) -> Inferer:
    """The bundles' train/validate inferer: :class:`AutocastInferer` when ``amp`` is on and the device is a CPU, else ``SimpleInferer``."""
    return AutocastInferer() if amp and torch.device(device).type == "cpu" else SimpleInferer()
