"""Loading SAM-family checkpoints from local paths into fedfms models, with a report of every key.

Layouts read: official SAM ``vit_b``/``vit_l``/``vit_h`` and MedSAM state dicts (same keys),
SAM-Med2D (``{"model": ...}`` or a plain state dict; its encoder adapters load into a model that
has them and are reported as unused otherwise), and checkpoints this project saves
(``{"model": ...}``, ``{"state_dict": ...}``, ``{"network": ...}`` or plain).

Rules, the same for every model:
* Base weights (encoder, prompt encoder, decoder transformer, IoU token) must be in the checkpoint
  with the model's shapes; a missing or mis-shaped base weight is an error (wrong size or file).
* Positional embeddings and the relative-position tables of global-attention blocks are
  interpolated when the checkpoint was made at another image size (bicubic / linear).
* New layers keep their initialisation when the checkpoint lacks them or has another shape:
  LoRA (A default init, B zero unless chosen otherwise), adapters (default Linear init), the
  FedFMS 1x1 head, and the decoder's output layers (mask tokens, upscaling, hypernetwork MLPs,
  IoU head) where their number or width changed (e.g. FLAP-SAM's decoder).
* Checkpoint keys the model does not have are reported as unexpected, never silently used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedfms.errors import DataError
from fedfms.io import load_torch_file

WRAPPER_KEYS = ("model", "state_dict", "network")
# Parameters a model may add or reshape on top of SAM; anything else is a base weight.
NEW_LAYER = re.compile(
    r"(\.lora_|_Adapter\.|\.Adapter\.|^head\.|^mask_decoder\.(mask_tokens|output_upscaling|output_hypernetworks_mlps|iou_prediction_head)\.)"
)


@dataclass
class LoadReport:
    """What happened to each key: loaded as is, interpolated, left initialised, or unexpected."""

    loaded: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)  # new layers absent or re-shaped in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model

    def summary(self) -> str:
        lines = [
            f"loaded {len(self.loaded)}, interpolated {len(self.interpolated)}, "
            f"initialised {len(self.initialised)}, unexpected {len(self.unexpected)}"
        ]
        for title, keys in (("interpolated", self.interpolated), ("initialised (new layers)", self.initialised), ("unexpected (unused)", self.unexpected)):
            if keys:
                lines.append(f"{title}:")
                lines.extend(f"  {k}" for k in keys)
        return "\n".join(lines)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local checkpoint file, unwrapping ``{"model": ...}``-style containers."""
    path = Path(path)
    obj = load_torch_file(path, "checkpoint not found", "a PyTorch checkpoint")
    while isinstance(obj, dict) and len(obj) and not _is_state_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise DataError(path, f"holds no state dict (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise DataError(path, "holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _is_state_dict(obj: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, H, W, C) absolute position embedding resized to ``grid`` (bicubic)."""
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def interpolate_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, C) relative-position table resized to ``length`` rows (linear), as SAM does at run time."""
    resized = F.interpolate(table.T[None].float(), size=length, mode="linear", align_corners=False)
    return resized[0].T.to(table.dtype)


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | dict[str, torch.Tensor]) -> LoadReport:
    """Load ``checkpoint`` (a path or a state dict) into ``model`` by the rules of this module."""
    source = str(checkpoint) if not isinstance(checkpoint, dict) else "state dict"
    state = read_state_dict(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    target = model.state_dict()
    report, problems, updates = LoadReport(), [], {}
    for key, current in target.items():
        if key not in state:
            if NEW_LAYER.search(key):
                report.initialised.append(key)
            else:
                problems.append(f"{key}: missing")
            continue
        value = state[key]
        if value.shape == current.shape:
            updates[key] = value
            report.loaded.append(key)
        elif key.endswith("pos_embed") and value.ndim == 4:
            updates[key] = interpolate_pos_embed(value, tuple(current.shape[1:3]))
            report.interpolated.append(key)
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == current.shape[1]:
            updates[key] = interpolate_rel_pos(value, current.shape[0])
            report.interpolated.append(key)
        elif NEW_LAYER.search(key):
            report.initialised.append(key)
        else:
            problems.append(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(current.shape)} in the model")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(source, f"does not fit this model ({len(problems)} base weights missing or mis-shaped; wrong size or file?):\n  {shown}")
    report.unexpected = sorted(set(state) - set(target))
    with torch.no_grad():
        for key, value in updates.items():
            target[key].copy_(value)
    return report
