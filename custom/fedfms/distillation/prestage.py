"""FM-instructed initialisation: the student network trained on the server's proxy set before FedAvg.

Three starts for a federation (``../shared/papers/fm_instructed_init.txt``):

``random``    the network as built (no pre-stage);
``pretrain``  supervised pre-training on the proxy set (Dice loss);
``fm``        distillation from a frozen SAM-family teacher prompted with each slice's ground-truth
              box: ``alpha * KL(teacher || student) + (1 - alpha) * Dice`` (:class:`DistillationLoss`).

The proxy set is the ``server_proxy.json`` datalist that ``fedfms partition`` carves from the
training cases; no client ever sees it. The student is trained with MONAI's ``SupervisedTrainer``
on the bundle's own sample transforms (so it sees exactly what the clients will feed it; cached by
``CacheDataset``), Adam, and a random flip applied to image, label and teacher logits together. The teacher's logits come
from :func:`fedfms.distillation.teacher_cache.teacher_logits` at the prepared label resolution
and are resized with the label to the student's output size.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader, Dataset, load_decathlon_datalist
from monai.engines import PrepareBatch, SupervisedTrainer, default_prepare_batch
from monai.metrics import DiceMetric
from monai.transforms import Compose, EnsureTyped, RandFlipd, Resized
from monai.utils import CommonKeys, set_determinism
from torch import nn

from fedfms.distillation.losses import DistillationLoss
from fedfms.distillation.teacher_cache import TeacherSpec, load_slice, teacher_logits
from fedfms.errors import DataError

INIT_MODES = ("random", "pretrain", "fm")
TEACHER = "teacher"  # data key of the teacher's logits


@dataclass
class PrestageSettings:
    """How the student is trained on the proxy set (the paper: alpha 0.6, Adam, lr 1e-4)."""

    mode: str = "fm"
    alpha: float = 0.6
    epochs: int = 5
    learning_rate: float = 1e-4
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in INIT_MODES:
            raise ValueError(f"unknown init mode {self.mode!r}; expected one of {', '.join(INIT_MODES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1 and learning_rate > 0, got {self.epochs}, {self.batch_size}, {self.learning_rate}")
        DistillationLoss(self.alpha)  # validates alpha


@dataclass
class PrestageRecord:
    """What the pre-stage did, for the log, ``prestage.json`` and ``fedfms report``."""

    mode: str
    proxy: dict
    settings: dict
    teacher: dict | None = None
    student: dict = field(default_factory=dict)


def load_proxy(path: str | os.PathLike) -> list[dict]:
    """The proxy set's samples, checked: the datalist exists, is not empty, its files exist, it has foreground."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no server proxy set: carve one with `fedfms partition ... --proxy-fraction F` (F > 0), or use init mode 'random'")
    samples = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training")
    if not samples:
        raise DataError(path, "the server proxy set is empty: partition with a larger --proxy-fraction")
    for sample in samples:
        for key in ("image", "label"):
            if not Path(sample[key]).is_file():
                raise DataError(sample[key], f"listed in the server proxy set {path} but missing")
    if not any((load_slice(s["label"]) > 0).any() for s in samples):
        raise DataError(path, f"none of the {len(samples)} proxy slices has foreground: there is nothing to distil or pre-train on")
    return samples


class TeacherTargetBatch(PrepareBatch):
    """(image, target) with the target the label, or label and teacher logits as two channels."""

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if TEACHER not in batchdata:
            return image, label
        return image, torch.cat([label, batchdata[TEACHER].to(device=device, non_blocking=non_blocking)], dim=1)


def student_transforms(sample_transforms: Sequence, label_size: int, with_teacher: bool, augment: bool) -> Compose:
    """The bundle's sample transforms, the teacher logits resized with the label, and a joint flip."""
    keys = ["image", "label"]
    extra = []
    if with_teacher:
        keys.append(TEACHER)
        extra += [Resized(TEACHER, spatial_size=(label_size, label_size), mode="bilinear"), EnsureTyped(TEACHER, dtype=torch.float32, track_meta=False)]
    if augment:
        extra.append(RandFlipd(keys, prob=0.5, spatial_axis=0))
    return Compose([*sample_transforms, *extra])


def proxy_dice(network: nn.Module, samples: Sequence[dict], transforms: Compose, device: torch.device, batch_size: int = 16) -> float:
    """Mean 2D Dice of ``network`` (1-channel logits, threshold 0) over the slices with foreground, as the bundles' MeanDice."""
    metric = DiceMetric(include_background=True, ignore_empty=True)
    network.eval()
    with torch.no_grad():
        for batch in DataLoader(Dataset(list(samples), transforms), batch_size=batch_size):
            image, label = default_prepare_batch(batch, device)
            metric((network(image) > 0).float(), label)
    return float(metric.aggregate().item())


def logits_dice(logits: torch.Tensor, samples: Sequence[dict]) -> float:
    """Mean 2D Dice of stored logits (N, 1, h, w) against the prepared labels, slices with foreground only."""
    labels = torch.stack([torch.from_numpy(load_slice(s["label"]).astype(np.float32)) for s in samples])[:, None]
    metric = DiceMetric(include_background=True, ignore_empty=True)
    metric((logits > 0).float(), labels)
    return float(metric.aggregate().item())


def train_student(
    network: nn.Module,
    samples: Sequence[dict],
    transforms: Compose,
    settings: PrestageSettings,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train ``network`` in place with MONAI's SupervisedTrainer; return the mean loss of each epoch."""
    alpha = settings.alpha if settings.mode == "fm" else 0.0
    # Every transform before the random flip is deterministic: computed once, not once per epoch.
    dataset = CacheDataset(list(samples), transforms, progress=False)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=settings.epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=settings.learning_rate),
        loss_function=DistillationLoss(alpha),
        prepare_batch=TeacherTargetBatch(),
        decollate=False,
    )
    batch_losses: list[float] = []
    epoch_losses: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _keep_loss(engine) -> None:
        batch_losses.append(engine.state.output[CommonKeys.LOSS].item())

    @trainer.on(Events.EPOCH_COMPLETED)
    def _log_epoch(engine) -> None:
        epoch_losses.append(sum(batch_losses) / len(batch_losses))
        batch_losses.clear()
        log(f"pre-stage ({settings.mode}) epoch {engine.state.epoch}/{settings.epochs}: loss {epoch_losses[-1]:.4f}")

    trainer.run()
    return epoch_losses


def run_prestage(
    network: nn.Module,
    proxy_datalist: str | os.PathLike,
    sample_transforms: Sequence,
    label_size: int,
    settings: PrestageSettings,
    teacher: TeacherSpec | None,
    cache_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, PrestageRecord]:
    """Train a copy of ``network`` on the proxy set by ``settings.mode``; return it and the record.

    Inputs are checked before any work (proxy set, teacher checkpoint), so a bad one stops a
    federated job before round 0 with a :class:`~fedfms.errors.DataError` naming the path.
    """
    if settings.mode == "random":
        raise ValueError("init mode 'random' has no pre-stage")
    distil = settings.mode == "fm"
    if distil and teacher is None:
        raise ValueError("init mode 'fm' needs a teacher")
    samples = load_proxy(proxy_datalist)
    if distil:
        teacher.checkpoint_path()
    device = torch.device(device)
    set_determinism(seed=settings.seed)
    record = PrestageRecord(settings.mode, {"datalist": str(proxy_datalist), "slices": len(samples)}, asdict(settings))
    if distil:
        found = teacher_logits(samples, teacher, cache_dir, log)
        record.proxy["foreground_slices"] = sum(found.foreground)
        record.teacher = {
            **asdict(teacher),
            "cache_file": str(found.cache_file),
            "cache_hit": found.cache_hit,
            "seconds": round(found.seconds, 1),
            "proxy_dice": logits_dice(found.logits, samples),
        }
        log(f"teacher {teacher.kind}: proxy Dice {record.teacher['proxy_dice']:.4f} ({'cached' if found.cache_hit else 'computed'} in {found.seconds:.1f} s)")
        samples = [{**s, TEACHER: logits} for s, logits in zip(samples, found.logits)]
    student = copy.deepcopy(network).to(device)
    evaluation = student_transforms(sample_transforms, label_size, with_teacher=distil, augment=False)
    start = time.perf_counter()
    before = proxy_dice(student, samples, evaluation, device)
    losses = train_student(student, samples, student_transforms(sample_transforms, label_size, distil, augment=True), settings, device, log)
    after = proxy_dice(student, samples, evaluation, device)
    record.student = {"proxy_dice_before": before, "proxy_dice": after, "epoch_loss": losses, "seconds": round(time.perf_counter() - start, 1)}
    log(f"student after the {settings.mode} pre-stage: proxy Dice {after:.4f} (before {before:.4f})")
    return student.cpu(), record
