"""Image embeddings of a frozen encoder, computed once per input image and reused.

When a strategy trains nothing in the image encoder (DecFT, PDecFT), the encoder maps the same
image to the same embedding in every epoch and every round: only the decoder's work changes.
:class:`EmbeddingCache` keeps the embeddings it computed, keyed by the *content* of each input
image (a hash of its bytes, shape and dtype), so whatever the data pipeline did to the image (a
random flip, a crop) is part of the key: a flipped slice is a different image with its own
embedding, never the unflipped one's. Results are the encoder's own, computed the first time an
image is seen; a later hit returns them.

The cache empties itself when the encoder changes: any in-place change of its weights (loading a
state dict, an optimiser step) bumps the tensors' version counters, and moving it to another device
or dtype gives new storage, so the encoder's signature (storage and version of every tensor) is
compared on each call. The mode (train/eval) and autocast state are part of the key. Memory is
bounded: least recently used embeddings are dropped beyond ``max_mb``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn


class EmbeddingCache:
    """Embeddings of a frozen encoder per input image, least recently used dropped beyond ``max_mb`` megabytes.

    Args:
        max_mb: memory bound of the kept embeddings, in MiB (on the device they were computed on).
    """

    def __init__(self, max_mb: float) -> None:
        if not max_mb > 0:
            raise ValueError(f"embedding cache size must be > 0 MiB, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self._store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._signature: tuple | None = None
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0

    def embed(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``encoder(images)`` without gradients, computed only for the images not seen before."""
        signature = _signature(encoder)
        if signature != self._signature:
            self.clear()
            self._signature = signature
        keys = [self._key(image, encoder.training) for image in images]
        first: dict[bytes, int] = {}  # one encoder pass per new image: neighbouring stacks of a batch share slices
        for i, key in enumerate(keys):
            if key not in self._store:
                first.setdefault(key, i)
        missing = sorted(first.values())
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            with torch.no_grad():
                computed = encoder(images[missing])
            fresh = {keys[i]: embedding.clone() for i, embedding in zip(missing, computed)}
        self.misses += len(fresh)
        self.hits += len(keys) - len(fresh)
        out = torch.stack([fresh[key] if key in fresh else self._touch(key) for key in keys])
        for key, embedding in fresh.items():
            self._put(key, embedding)
        return out

    def _touch(self, key: bytes) -> torch.Tensor:
        self._store.move_to_end(key)
        return self._store[key]

    def _put(self, key: bytes, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if size > self.max_bytes or key in self._store:
            return
        while self._bytes + size > self.max_bytes:
            _, dropped = self._store.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()
        self._store[key] = embedding
        self._bytes += size

    @staticmethod
    def _key(image: torch.Tensor, training: bool) -> bytes:
        digest = hashlib.blake2b(digest_size=20)
        image = image.detach()
        digest.update(f"{tuple(image.shape)}|{image.dtype}|{training}|{torch.is_autocast_enabled(image.device.type)}".encode())
        digest.update(image.contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return digest.digest()


def _signature(encoder: nn.Module) -> tuple:
    """Storage and in-place version of every tensor of ``encoder``'s state: any change to its weights changes it.

    The state dict, not every buffer: a non-persistent buffer may be derived from the weights and
    come and go with the mode (TinyViT's attention keeps its bias table only in eval mode).
    """
    return tuple((name, t.device.type, t.dtype, t.data_ptr(), t._version) for name, t in encoder.state_dict(keep_vars=True).items())
