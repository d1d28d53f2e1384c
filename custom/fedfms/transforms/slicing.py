"""Dictionary transforms that turn a 3D volume into 2D training samples.

The depth (slice) axis is the last spatial axis after orientation to RAS, i.e. axial slices.
Every transform here works on the whole volume at once: one gather or one interpolation call per
volume, never a Python loop per slice.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.transforms.traits import MultiSampleTrait


def _plain(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A plain tensor: the per-slice arrays made here no longer share the volume's affine."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    return torch.as_tensor(x)


def stack_indices(depth: int, num_slices: int) -> np.ndarray:
    """Slice indices of every stack, shape (depth, num_slices).

    Stack ``k`` holds slices ``k - (N-1)/2 .. k + (N-1)/2``; indices past either end repeat the
    first or last slice (edge replication), so every slice is the centre of exactly one stack.
    """
    if num_slices < 1 or num_slices % 2 == 0:
        raise ValueError(f"num_slices must be a positive odd number, got {num_slices}")
    if depth < 1:
        raise ValueError(f"volume has no slices (depth {depth})")
    half = num_slices // 2
    offsets = np.arange(-half, half + 1)
    return np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)


class SelectChanneld(MapTransform):
    """Keep one channel of a channel-first multi-channel image, e.g. T2 (channel 0) of MSD prostate."""

    def __init__(self, keys: KeysCollection, channel: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channel = channel

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            channels = d[key].shape[0]
            if not -channels <= self.channel < channels:
                raise ValueError(f"channel {self.channel} requested for {key!r}, which has {channels} channel(s)")
            index = self.channel % channels
            d[key] = d[key][index : index + 1]
        return d


class DepthToChanneld(MapTransform):
    """Move the depth axis of a single-channel volume to the channel axis: (1, H, W, D) -> (D, H, W).

    MONAI's 2D transforms (``Resized`` with a 2D ``spatial_size``, intensity transforms) then treat
    every slice as a channel and process all of them in one call, exactly as they would one slice.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = _plain(d[key])
            if volume.ndim != 4 or volume.shape[0] != 1:
                raise ValueError(f"{key!r} must be a single-channel volume (1, H, W, D), got shape {tuple(volume.shape)}")
            d[key] = volume[0].movedim(-1, 0).contiguous()
        return d


class SliceStacksd(MapTransform, MultiSampleTrait):
    """Cut (D, H, W) volumes into D samples, one per slice, each a stack of ``num_slices`` slices.

    Each sample's image is the (N, H, W) stack centred on its slice (edges replicate the first or
    last slice). Its label is the centre slice's label, (1, H, W), or with ``all_label_slices`` the
    labels of all N slices, (N, H, W), for models that supervise every slice of the stack. The
    sample's ``slice_key`` holds the index of its centre slice; other dictionary items are copied.

    Args:
        keys: images and labels to slice; all must have the same depth.
        num_slices: stack size N, odd (1, 3, 5 ...).
        label_key: the label among ``keys``; None if the data has no label.
        all_label_slices: give the label of every slice in the stack instead of the centre one.
        keep_empty: keep samples whose centre label slice has no foreground (the papers keep them).
        slice_key: where to store the centre slice index.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_slices: int = 5,
        label_key: str | None = "label",
        all_label_slices: bool = False,
        keep_empty: bool = True,
        slice_key: str = "slice",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        stack_indices(1, num_slices)  # validates num_slices early
        if label_key is not None and label_key not in self.keys:
            raise ValueError(f"label_key {label_key!r} is not one of keys {self.keys}")
        if not keep_empty and label_key is None:
            raise ValueError("dropping empty slices needs a label_key")
        self.num_slices = num_slices
        self.label_key = label_key
        self.all_label_slices = all_label_slices
        self.keep_empty = keep_empty
        self.slice_key = slice_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict[Hashable, torch.Tensor]]:
        d = dict(data)
        volumes = {key: _plain(d[key]) for key in self.key_iterator(d)}
        depths = {key: int(v.shape[0]) for key, v in volumes.items()}
        if len(set(depths.values())) != 1:
            raise ValueError(f"keys have different depths: {depths}")
        depth = next(iter(depths.values()))
        stacks = {key: self._stack(key, volume) for key, volume in volumes.items()}
        slices = self._kept_slices(depth, volumes)
        return [{**d, **{key: stack[k] for key, stack in stacks.items()}, self.slice_key: k} for k in slices]

    def _stack(self, key: Hashable, volume: torch.Tensor) -> torch.Tensor:
        """(D, N, H, W) stacks as a view: sample k is rows k..k+N-1 of the edge-padded volume.

        Only the padded volume (D + N - 1 slices) is copied, so every sample is contiguous and
        memory grows with the volume, not with N times the volume.
        """
        if self.num_slices == 1 or (key == self.label_key and not self.all_label_slices):
            return volume[:, None]  # each sample keeps its centre slice
        half = self.num_slices // 2
        padded = torch.cat([volume[:1].expand(half, *volume.shape[1:]), volume, volume[-1:].expand(half, *volume.shape[1:])])
        return padded.unfold(0, self.num_slices, 1).movedim(-1, 1)

    def _kept_slices(self, depth: int, volumes: dict[Hashable, torch.Tensor]) -> list[int]:
        if self.keep_empty:
            return list(range(depth))
        label = volumes[self.label_key]
        return torch.nonzero(label.reshape(depth, -1).any(dim=1)).flatten().tolist()
