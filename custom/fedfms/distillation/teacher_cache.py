"""The frozen teacher's logits on the proxy set: computed once per teacher and data, then reused.

Running a SAM-family teacher is the slow part of FM-instructed initialisation (LiteMedSAM's
encoder takes about 2 s per 256 px slice on a 2-core CPU), and its output depends only on the
teacher and the proxy samples. :func:`teacher_logits` therefore stores the logits in
``<cache_dir>/teacher_<key>.pt`` (float16, foreground slices only) beside a readable
``teacher_<key>.json`` that says what they were made from:

* the teacher: kind, size, input size, normalisation, box jitter and its seed, the no-object
  logit, the output size, the checkpoint's SHA-256, and the fedfms version;
* the samples: the SHA-256 of every image and label file, in order.

The key is a hash of exactly that record: contents, never paths. The same teacher on the same
bytes reuses the file wherever the data and the weights live (a reinstall moves the packaged
checkpoint to another virtual environment), and any change (other weights, another jitter, a relabelled slice, one
sample more) computes and stores new logits. Slices whose label is empty are never run: the
teacher's answer for them is the constant no-object logit.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import fedfms
from fedfms.errors import DataError
from fedfms.io import atomic_write, file_sha256, save_json
from fedfms.models.teacher import EMPTY_LOGIT, PRECISIONS, TEACHER_KINDS, BoxPromptTeacher, build_teacher, fastest_precision
from fedfms.transforms.stored import load_prepared_image

CHUNK = 1  # slices per teacher call: on a 2-core CPU one at a time is fastest (float32: 2.2 s vs 3.1 s per slice in batches of 8)


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher runs and how it is prompted; every field is part of the cache key.

    ``checkpoint`` None is the kind's packaged weights (``litemedsam``); other kinds need a path.
    ``image_size`` None is the kind's native input size. ``precision`` ``auto`` is
    :func:`~fedfms.models.teacher.fastest_precision` of the CPU the pre-stage runs on; the key
    holds the precision used, so logits of another precision are never taken for these.
    """

    kind: str = "litemedsam"
    checkpoint: str | None = None
    size: str = "vit_b"
    image_size: int | None = None
    box_jitter: float = 0.0
    seed: int = 0
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"unknown teacher kind {self.kind!r}; expected one of {', '.join(TEACHER_KINDS)}")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise ValueError(f"unknown teacher precision {self.precision!r}; expected auto or one of {', '.join(PRECISIONS)}")
        if self.checkpoint is None and TEACHER_KINDS[self.kind].packaged_checkpoint is None:
            raise ValueError(f"the {self.kind} teacher needs a local checkpoint path (teacher checkpoint)")

    def checkpoint_path(self) -> Path:
        """The weights file, checked to exist (a missing teacher must stop a run before any work)."""
        packaged = TEACHER_KINDS[self.kind].packaged_checkpoint
        path = Path(self.checkpoint) if self.checkpoint else Path(packaged())
        if not path.is_file():
            raise DataError(path, f"{self.kind} teacher checkpoint not found")
        return path

    def build(self, output_size: int | tuple[int, int]) -> BoxPromptTeacher:
        return build_teacher(
            self.kind, self.size, self.checkpoint_path(), self.image_size, box_jitter=self.box_jitter, seed=self.seed,
            output_size=output_size, precision=self.resolved_precision(),
        )

    def resolved_precision(self) -> str:
        """The precision the teacher runs in (``auto``: the fastest this CPU computes natively)."""
        return fastest_precision("cpu") if self.precision == "auto" else self.precision

    def describe(self, output_size: Sequence[int]) -> dict:
        """This teacher as the cache key sees it: the checkpoint by content, not by path."""
        kind = TEACHER_KINDS[self.kind]
        settings = {k: v for k, v in asdict(self).items() if k != "checkpoint"}
        return {
            **settings,
            "checkpoint_sha256": file_sha256(self.checkpoint_path()),
            "image_size": self.image_size or kind.image_size,
            "precision": self.resolved_precision(),
            "normalisation": kind.normalisation,
            "empty_logit": EMPTY_LOGIT,
            "output_size": list(output_size),
            "fedfms_version": fedfms.__version__,
        }


@dataclass
class TeacherLogits:
    """The teacher's logits for every sample (float32, (N, 1, h, w)) and where they came from."""

    logits: torch.Tensor
    foreground: list[bool]
    cache_file: Path
    cache_hit: bool
    seconds: float


def load_slice(path: str | os.PathLike, image: bool = False) -> np.ndarray:
    """The centre slice (H, W) of a prepared sample (N, H, W): the slice a stack's label belongs to.

    An ``image`` is read at its prepared size (:func:`fedfms.transforms.stored.load_prepared_image`).
    """
    try:
        array = load_prepared_image(path) if image else np.load(path)
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot be read as a prepared .npy sample ({err})") from err
    if array.ndim != 3:
        raise DataError(path, f"expected a prepared sample of shape (N, H, W), got {array.shape}")
    return array[array.shape[0] // 2]


def teacher_logits(
    samples: Sequence[dict], spec: TeacherSpec, cache_dir: str | os.PathLike, log: Callable[[str], None] = print
) -> TeacherLogits:
    """The teacher's logits for ``samples`` (datalist entries with ``image`` and ``label``), cached."""
    start = time.perf_counter()
    labels = [load_slice(s["label"]) for s in samples]
    foreground = [bool((label > 0).any()) for label in labels]
    output_size = labels[0].shape
    made_from = {
        "teacher": spec.describe(output_size),
        "samples": [[file_sha256(s["image"]), file_sha256(s["label"])] for s in samples],
    }
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:20]
    cache_file = Path(cache_dir) / f"teacher_{key}.pt"
    cached = _read(cache_file, made_from)
    if cached is not None:
        log(f"teacher logits reused from {cache_file} ({sum(foreground)} foreground of {len(samples)} slices)")
        return TeacherLogits(_expand(cached, foreground, output_size), foreground, cache_file, True, time.perf_counter() - start)
    log(f"running the {spec.kind} teacher on {sum(foreground)} foreground of {len(samples)} proxy slices (cache: {cache_file})")
    computed = _run_teacher(spec.build(output_size), samples, labels, foreground, log)
    _write(cache_file, made_from, samples, spec.checkpoint_path(), computed)
    return TeacherLogits(_expand(computed, foreground, output_size), foreground, cache_file, False, time.perf_counter() - start)


def _run_teacher(teacher: BoxPromptTeacher, samples: Sequence[dict], labels: list[np.ndarray], foreground: list[bool], log: Callable[[str], None]) -> torch.Tensor:
    """Logits (M, 1, h, w) of the M foreground slices, in sample order."""
    index = [i for i, present in enumerate(foreground) if present]
    out = []
    for done in range(0, len(index), CHUNK):
        chunk = index[done : done + CHUNK]
        images = torch.stack([torch.from_numpy(load_slice(samples[i]["image"], image=True)) for i in chunk])[:, None]
        masks = torch.stack([torch.from_numpy(labels[i].astype(np.float32)) for i in chunk])[:, None]
        out.append(teacher(images, masks))
        log(f"teacher: {done + len(chunk)} of {len(index)} foreground slices")
    return torch.cat(out).to(torch.float16)


def _expand(foreground_logits: torch.Tensor, foreground: list[bool], output_size: Sequence[int]) -> torch.Tensor:
    """Every sample's logits: the stored ones, and the no-object logit for empty slices."""
    logits = torch.full((len(foreground), 1, *output_size), EMPTY_LOGIT)
    logits[torch.tensor(foreground)] = foreground_logits.float()
    return logits


def _read(path: Path, made_from: dict) -> torch.Tensor | None:
    if not path.is_file():
        return None
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return stored["logits"] if stored.get("made_from") == json.loads(json.dumps(made_from)) else None


def _write(path: Path, made_from: dict, samples: Sequence[dict], checkpoint: Path, logits: torch.Tensor) -> None:
    """The logits, and beside them what they were made from (the key's record plus the paths of this run, for people)."""
    atomic_write(path, lambda tmp: torch.save({"made_from": made_from, "logits": logits}, tmp))
    sources = [{"image": str(s["image"]), "label": str(s["label"])} for s in samples]
    save_json(path.with_suffix(".json"), {"made_from": made_from, "checkpoint": str(checkpoint), "sources": sources, "file": path.name})
