"""What robust aggregation costs and buys: server time and peak memory per round, and the pull of one poisoned site.

    .venv/bin/python benchmarks/bench_aggregation.py [--sites 3,10] [--strategies full,flap]

For each exchanged set (LiteMedSAM, size ``lite`` at 256 px: ``full`` fine-tuning, 9.8 M values;
``flap``, FLAP-SAM's LoRA and decoder layers) and each number of sites K, every rule aggregates the
same K updates (the initial weights plus Gaussian changes of norm about 1; one site's change is
boosted 100 times) in a process of its own, so its peak memory (VmHWM) is its own:

* ``mean``: NVFlare's ``WeightedAggregationHelper`` (FedAvg's own), or the LoRA-SVD aggregator;
* ``median`` and ``trimmed_mean`` (trim 0.2): :class:`fedfms.fl.aggregators.robust.RobustAggregator`, or the
  LoRA-SVD aggregator with that ``combine`` (on the products);
* ``clip+mean``: each change clipped to the honest sites' median norm, then the mean.

``pull`` is the norm of (aggregate - mean of the honest updates) over the honest change norm: how
far the poisoned site moved the global model (0: not at all). For LoRA layers it is measured on the
products B A (the factors themselves change basis in the SVD).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from common import peak_rss_mb, run_child

RULES = ("mean", "median", "trimmed_mean", "clip+mean")


def _updates(strategy: str, sites: int) -> tuple[dict, list[dict]]:
    from fedfms.fl.exchange import exchanged_keys
    from fedfms.models import build_model

    torch.manual_seed(0)
    model = build_model("flapsam", strategy, "lite", 256, num_classes=1)
    keys = exchanged_keys(model, "global")
    start = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys and v.is_floating_point()}
    count = sum(v.numel() for v in start.values())
    updates = []
    for site in range(sites):
        scale = (100.0 if site == 0 else 1.0) / count ** 0.5  # site 0 pulls 100 times as hard
        updates.append({k: v + torch.randn_like(v) * scale for k, v in start.items()})
    return start, updates


def _effective(params: dict) -> dict:
    """The tensors as the model uses them: each LoRA pair as its product B A, every other tensor as it is."""
    from fedfms.fl.aggregators.lora_svd import lora_pairs

    pairs = lora_pairs(params)
    paired = {key for pair in pairs.values() for key in pair}
    effective = {k: torch.as_tensor(v).double() for k, v in params.items() if k not in paired}
    effective.update({layer: torch.as_tensor(params[b]).double() @ torch.as_tensor(params[a]).double() for layer, (a, b) in pairs.items()})
    return effective


def _norm(params: dict, reference: dict) -> float:
    params, reference = _effective(params), _effective(reference)
    return sum(float((params[k] - reference[k]).square().sum()) for k in reference) ** 0.5


def _honest_mean(updates: list[dict]) -> dict:
    """The mean of the honest sites' effective tensors (products for LoRA pairs), as factors of the same products."""
    from fedfms.fl.aggregators.lora_svd import aggregate_lora

    return aggregate_lora([(u, 1.0) for u in updates])[0]  # exact when the rank holds the mean product; else the best at that rank


def measure(strategy: str, sites: int, rule: str) -> dict:
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

    from fedfms.fl.aggregators.lora_svd import LoRASVDAggregator
    from fedfms.fl.aggregators.robust import RobustAggregator

    start, updates = _updates(strategy, sites)
    honest = _honest_mean(updates[1:])
    if rule == "clip+mean":
        bound = statistics.median(_norm(u, start) for u in updates[1:])
        updates = [{k: start[k] + (u[k] - start[k]) * min(1.0, bound / _norm(u, start)) for k in start} for u in updates]
    lora = strategy == "flap"
    began = time.perf_counter()
    if lora or rule in ("median", "trimmed_mean"):
        combine = "mean" if rule in ("mean", "clip+mean") else rule
        aggregator = LoRASVDAggregator(combine=combine) if lora else RobustAggregator(combine)
        for params in updates:
            aggregator.accept_model(FLModel(params=params, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 10}))
        result = aggregator.aggregate_model().params
    else:
        helper = WeightedAggregationHelper()
        for site, params in enumerate(updates):
            helper.add(params, 10, f"site-{site}", 0)
        result = helper.get_result()
    seconds = time.perf_counter() - began
    pull = _norm(result, honest) / statistics.median(_norm(u, start) for u in updates[1:])
    return {"strategy": strategy, "sites": sites, "rule": rule, "values": sum(v.numel() for v in start.values()),
            "seconds": round(seconds, 3), "peak_mb": round(peak_rss_mb()), "pull": round(pull, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="3,10")
    parser.add_argument("--strategies", default="full,flap")
    parser.add_argument("--child", nargs=3, metavar=("STRATEGY", "SITES", "RULE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.child[2])))
        return
    print("| strategy | values | sites | rule | seconds | peak MB | pull of the boosted site |")
    print("|---|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        for sites in (int(k) for k in args.sites.split(",")):
            for rule in RULES:
                r = run_child(sys.argv[0], ["--child", strategy, str(sites), rule])
                print(f"| {strategy} | {r['values']:,} | {sites} | {rule} | {r['seconds']} | {r['peak_mb']} | {r['pull']} |", flush=True)


if __name__ == "__main__":
    main()
