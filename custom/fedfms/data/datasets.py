"""Training and validation datasets that read each prepared sample from disk once.

The bundles load every sample from its ``.npy`` files and resize it, every epoch and every round.
:class:`BoundedCacheDataset` is MONAI's ``CacheDataset`` with its size given as memory: it keeps
the output of the deterministic transforms (load, channel, resize, type) for as many samples as
fit in ``max_mb`` MiB, measured on the first sample, and runs only the random ones (the flip) on
top. The rest are loaded as before, so a bound below the data's size changes speed, never results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data import CacheDataset
from monai.transforms import Compose, RandomizableTrait, Transform


class BoundedCacheDataset(CacheDataset):
    """MONAI's ``CacheDataset`` keeping as many samples as fit in ``max_mb`` MiB (0: none, a plain dataset).

    Args:
        data: the datalist's items.
        transform: the sample transforms; those before the first random one are cached.
        max_mb: memory bound of the cached samples, in MiB.
        kwargs: further ``CacheDataset`` arguments (``num_workers``, ``progress``...).
    """

    def __init__(self, data: Sequence, transform: Sequence[Callable] | Callable, max_mb: float = 1024, **kwargs) -> None:
        if max_mb < 0:
            raise ValueError(f"dataset cache size must be >= 0 MiB, got {max_mb}")
        transform = transform if isinstance(transform, Compose) else Compose(transform)
        self.sample_bytes = _cached_bytes(data[0], transform) if len(data) and max_mb else 0
        cache_num = min(len(data), int(max_mb * 2**20) // self.sample_bytes) if self.sample_bytes else 0
        super().__init__(data, transform, cache_num=cache_num, **{"progress": False, **kwargs})


def _cached_bytes(item, transform: Compose) -> int:
    """Bytes of the tensors ``item`` becomes after the deterministic transforms (what CacheDataset keeps)."""
    first_random = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    sample = transform(dict(item), end=first_random)
    values = sample.values() if isinstance(sample, dict) else [sample]
    return max(1, sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor)))
