"""Bytes one site sends per round under each compression mode, measured as NVFlare serialises them.

    .venv/bin/python benchmarks/bench_compression.py [--sizes lite:64,vit_b:1024] [--strategies full,lora_dec,flap]

For each FLAP-SAM network (size at its input size; ViT-B from random weights: the bytes do not
depend on the values) and strategy, the exchanged tensors travel as one site's round change
(``WEIGHT_DIFF``, small Gaussian values) through :class:`fedfms.fl.filters.compression.CompressWeights`
and are serialised with FOBS, as the sites' ``WireBytes`` filter measures them (tensors inline,
Shareable headers and framing included). Printed per row: the exchanged parameters, the bytes,
bytes per parameter, the times fewer than FullFT at fp32 of the same size, and the seconds to
compress and decompress on this machine. The goal of issue 20 is FLAP-SAM compressed at >= 200x
fewer bytes than FullFT fp32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

MODES = ("fp32", "fp16", "bf16", "blockwise8", "nf4", "fp4")


def _changes(size: str, image_size: int, strategy: str) -> dict[str, torch.Tensor]:
    from fedfms.fl.exchange import exchanged_keys
    from fedfms.models import build_model

    torch.manual_seed(0)
    model = build_model("flapsam", strategy, size, image_size, num_classes=1)
    keys = set(exchanged_keys(model, "global"))
    return {k: torch.randn_like(v) * 1e-3 for k, v in model.state_dict().items() if k in keys and v.is_floating_point()}


def _measure(changes: dict, mode: str) -> dict:
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.apis.fl_context import FLContext

    from fedfms.fl.filters.compression import CompressWeights, DecompressWeights
    from fedfms.fl.filters.wire import serialised_bytes

    shareable = DXO(DataKind.WEIGHT_DIFF, data=changes).to_shareable()
    compress_s = decompress_s = 0.0
    if mode != "fp32":
        start = time.perf_counter()
        shareable = CompressWeights(mode).process(shareable, FLContext())
        compress_s = time.perf_counter() - start
    size = serialised_bytes(shareable)
    if mode != "fp32":
        start = time.perf_counter()
        from_shareable(DecompressWeights().process(shareable, FLContext()))
        decompress_s = time.perf_counter() - start
    return {"bytes": size, "compress_s": compress_s, "decompress_s": decompress_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="lite:64,vit_b:1024", help="size:image_size, comma-separated")
    parser.add_argument("--strategies", default="full,lora_dec,flap")
    args = parser.parse_args()
    rows = []
    print(f"{'size':>6} {'strategy':>9} {'mode':>10} {'params':>11} {'bytes':>12} {'B/param':>8} {'x fewer':>8} {'compress s':>10} {'decompress s':>12}")
    for spec in args.sizes.split(","):
        size, image_size = spec.split(":")
        reference = None
        for strategy in args.strategies.split(","):
            changes = _changes(size, int(image_size), strategy)
            params = sum(v.numel() for v in changes.values())
            for mode in MODES:
                row = {"size": size, "image_size": int(image_size), "strategy": strategy, "mode": mode, "params": params, **_measure(changes, mode)}
                if strategy == "full" and mode == "fp32":
                    reference = row["bytes"]
                row["times_fewer_than_fullft_fp32"] = reference / row["bytes"] if reference else None
                rows.append(row)
                fewer = f"{row['times_fewer_than_fullft_fp32']:.1f}" if reference else "-"
                print(f"{size:>6} {strategy:>9} {mode:>10} {params:>11,} {row['bytes']:>12,} {row['bytes'] / params:>8.3f} {fewer:>8} "
                      f"{row['compress_s']:>10.2f} {row['decompress_s']:>12.2f}", flush=True)
            del changes
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
