"""Compressed model exchange: the global model and every update in fewer bytes, both ways.

Modes (:data:`MODES`): ``fp16`` and ``bf16`` cast each floating tensor; ``blockwise8`` (8 bits per
value, bitsandbytes' dynamic map, one fp32 scale per 4096 values), ``nf4`` and ``fp4`` (4 bits per
value, bitsandbytes' NormalFloat / FloatingPoint codes, one fp32 scale per 64 values). Integer
tensors travel as they are. The codes are bitsandbytes' own, run on CPU tensors; only the scales
travel with a payload (the code book follows from the mode).

Place :class:`CompressWeights` and :class:`DecompressWeights` around the wire for the ``train``
task: on the server, compress in ``task_data_filters`` and decompress in ``task_result_filters``
(so the :class:`~fedfms.fl.checks.updates.UpdateValidator` and the aggregators see full-precision
tensors); at each site, decompress after the ``WireBytes(down)`` filter and compress before
``WireBytes(up)``. ``fedfms job --compress MODE`` does this (:mod:`fedfms.fl.job_config`).

Why not NVFlare 2.9's ``ModelQuantizer``/``ModelDequantizer``: for ``blockwise8``, ``float4`` and
``normfloat4`` they move every tensor to CUDA (``.cuda()``), so they fail on a CPU site or server;
they quantise the server's shared task data in place; their 8-bit payload repeats the 256-value
code with every tensor; and a payload they cannot read raises in the filter, which NVFlare turns
into a filter error instead of a rejected update with its reason. Here a bad payload at the server
is marked (:data:`PAYLOAD_ERROR` in the update's meta) and the validator refuses it, naming why.

The worst error of a value is :func:`error_bound` times the largest magnitude of its block (the
tensor for the casts): half the widest gap of the mode's code book.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

MODES = ("fp16", "bf16", "blockwise8", "nf4", "fp4")
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
BLOCKWISE8_BLOCK = 4096  # bitsandbytes' default block of quantize_blockwise
FOUR_BIT_BLOCK = 64  # and of quantize_4bit
STATE = "fedfms_compression"  # DXO meta: {"mode": ..., "tensors": {key: {"dtype", "shape", "numpy", "absmax"}}}
PAYLOAD_ERROR = "fedfms_payload_error"  # DXO meta: why a payload could not be decompressed (the validator refuses it)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_EXPECTED = {"fp16": torch.float16, "bf16": torch.bfloat16, "blockwise8": torch.uint8, "nf4": torch.uint8, "fp4": torch.uint8}


class PayloadError(ValueError):
    """A compressed payload that cannot be read back: the message names the tensor and the problem."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown compression mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


def error_bound(mode: str) -> float:
    """Largest error of one value, as a fraction of the largest magnitude in its block."""
    check_mode(mode)
    if mode in CASTS:
        return torch.finfo(CASTS[mode]).eps / 2  # round to nearest: half a unit in the last place
    code = _code_book(mode)
    return float((code.sort().values.diff().max() / code.abs().max()) / 2)


@functools.cache
def _code_book(mode: str) -> torch.Tensor:
    """The mode's code book (bitsandbytes'): the same for every tensor, so made once."""
    import bitsandbytes.functional as bnb  # imported on first use: it reports its backends at import

    return bnb.create_dynamic_map() if mode == "blockwise8" else bnb.get_4bit_type(mode, device="cpu")


def _block(mode: str) -> int:
    return BLOCKWISE8_BLOCK if mode == "blockwise8" else FOUR_BIT_BLOCK


def compress(params: Mapping, mode: str) -> tuple[dict, dict]:
    """``params`` (NumPy arrays or torch tensors) in ``mode``: the data that travels and its state (see :data:`STATE`)."""
    check_mode(mode)
    data, tensors = {}, {}
    for key, value in params.items():
        source = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if not source.is_floating_point():
            data[key] = value
            continue
        entry = {"dtype": str(source.dtype).removeprefix("torch."), "shape": list(source.shape), "numpy": not isinstance(value, torch.Tensor)}
        data[key], absmax = _quantize(source.detach().cpu(), mode)
        if absmax is not None:
            entry["absmax"] = absmax
        tensors[key] = entry
    return data, {"mode": mode, "tensors": tensors}


def _quantize(tensor: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if mode in CASTS:
        limit = torch.finfo(CASTS[mode]).max
        return tensor.clamp(-limit, limit).to(CASTS[mode]), None
    import bitsandbytes.functional as bnb

    flat = tensor.reshape(-1).float().contiguous()
    if mode == "blockwise8":
        quantized, state = bnb.quantize_blockwise(flat, blocksize=BLOCKWISE8_BLOCK)
    else:
        quantized, state = bnb.quantize_4bit(flat, blocksize=FOUR_BIT_BLOCK, quant_type=mode)
    return quantized, state.absmax


def decompress(data: Mapping, state: Mapping) -> dict:
    """The tensors :func:`compress` took, from what travelled; :class:`PayloadError` names what is wrong."""
    if not isinstance(state, Mapping) or not isinstance(state.get("tensors"), Mapping):
        raise PayloadError("the compression state has no per-tensor entries ('tensors')")
    mode = state.get("mode")
    if mode not in MODES:
        raise PayloadError(f"unknown compression mode {mode!r} in the payload's metadata")
    unknown = sorted(set(state["tensors"]) - set(data))
    if unknown:
        raise PayloadError(f"key {unknown[0]}: described in the compression state but not in the payload")
    params = dict(data)
    for key, entry in state["tensors"].items():
        params[key] = _dequantize(key, data[key], entry, mode)
    return params


def _dequantize(key: str, value, entry, mode: str):
    if not isinstance(entry, Mapping) or entry.get("dtype") not in _DTYPES or not isinstance(entry.get("shape"), list):
        raise PayloadError(f"key {key}: the compression state lacks a valid source dtype and shape")
    value = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if value.dtype != _EXPECTED[mode]:
        raise PayloadError(f"key {key}: a {mode} payload holds {_EXPECTED[mode]} values, this one {value.dtype}")
    shape = tuple(int(n) for n in entry["shape"])
    numel = math.prod(shape)
    restored = value if mode in CASTS else _from_blocks(key, value, entry.get("absmax"), mode, numel)
    if restored.numel() != numel:
        raise PayloadError(f"key {key}: {restored.numel()} values for the shape {list(shape)} in the compression state")
    restored = restored.reshape(shape).to(_DTYPES[entry["dtype"]])
    return restored.numpy() if entry.get("numpy") else restored


def _from_blocks(key: str, value: torch.Tensor, absmax, mode: str, numel: int) -> torch.Tensor:
    import bitsandbytes.functional as bnb

    if not isinstance(absmax, torch.Tensor) and not isinstance(absmax, np.ndarray):
        raise PayloadError(f"key {key}: no block scales (absmax) for a {mode} payload")
    absmax = torch.as_tensor(absmax).float()
    blocks = math.ceil(numel / _block(mode))
    if absmax.shape != (blocks,) or not torch.isfinite(absmax).all():
        raise PayloadError(f"key {key}: {tuple(absmax.shape)} block scales (absmax), {blocks} finite ones expected for {numel} values")
    codes = numel if mode == "blockwise8" else (numel + 1) // 2  # 4-bit: two codes a byte
    if value.numel() != codes:
        raise PayloadError(f"key {key}: {value.numel()} bytes of {mode} codes for {numel} values")
    try:
        if mode == "blockwise8":
            return bnb.dequantize_blockwise(value.reshape(-1), absmax=absmax, code=_code_book(mode), blocksize=BLOCKWISE8_BLOCK)
        state = bnb.QuantState(absmax=absmax, shape=torch.Size([numel]), code=_code_book(mode), blocksize=FOUR_BIT_BLOCK,
                               quant_type=mode, dtype=torch.float32)
        return bnb.dequantize_4bit(value.reshape(-1, 1), quant_state=state)
    except (RuntimeError, ValueError) as e:  # what the codec itself finds wrong
        raise PayloadError(f"key {key}: cannot decode the {mode} codes: {e}") from e


class CompressWeights(DXOFilter):
    """Sends a model's weights (or weight changes) in ``mode`` (see the module docstring).

    Args:
        mode: one of :data:`MODES`.
    """

    def __init__(self, mode: str) -> None:
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        self.mode = check_mode(mode)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if STATE in dxo.meta:
            return None  # already compressed
        data, state = compress(dxo.data, self.mode)  # a new dict: the server's task data is shared by every site's copy
        return DXO(dxo.data_kind, data=data, meta={**_own_meta(dxo), STATE: state})


class DecompressWeights(DXOFilter):
    """Restores what :class:`CompressWeights` sent; a payload without compression state passes unchanged.

    Args:
        reject_bad_payload: True (the server): a payload that cannot be read back keeps its data
            and gets :data:`PAYLOAD_ERROR` in its meta, which the update validator refuses with the
            reason. False (a site): it raises, and the site's task fails with the reason.
    """

    def __init__(self, reject_bad_payload: bool = False) -> None:
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        self.reject_bad_payload = reject_bad_payload

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if STATE not in dxo.meta:
            return None
        meta = {k: v for k, v in _own_meta(dxo).items() if k != STATE}
        try:
            data = decompress(dxo.data, dxo.meta[STATE])
        except PayloadError as e:
            if not self.reject_bad_payload:
                raise
            self.log_error(fl_ctx, f"bad compressed payload: {e}")
            return DXO(dxo.data_kind, data=dxo.data, meta={**meta, PAYLOAD_ERROR: str(e)})
        return DXO(dxo.data_kind, data=data, meta=meta)


def _own_meta(dxo: DXO) -> dict:
    """The DXO's meta without NVFlare's filter history, which DXOFilter carries over to the new DXO itself."""
    return {k: v for k, v in dxo.meta.items() if k != MetaKey.FILTER_HISTORY}
