"""Epoch time of the bundles' training with and without their caches, on the demo data.

    .venv/bin/python benchmarks/bench_caches.py embedding [--strategies dec,pdec] [--image-size 128] [--epochs 3] [--no-flip]
    .venv/bin/python benchmarks/bench_caches.py dataset [--bundle fedmsa_prostate] [--epochs 3]

A bundle's own trainer (MONAI SupervisedTrainer, the cpu_demo profile: LiteMedSAM with its
packaged weights) trains one site of the demo's natural partition (``--site``; the data of
``make demo``) for ``--epochs`` full epochs, once with the cache off (0 MiB) and once with the
bundle's default (1024 MiB), each in its own process, same seed. It prints each epoch's seconds
(the dataset cache fills while the trainer is built: that time is printed too), the speed-up of
the epochs after the first, and the largest difference between the two runs' per-iteration losses.

``embedding``: the FLAP-SAM bundle with a frozen-encoder strategy, ``embedding_cache_mb``
(:mod:`fedfms.models.embedding_cache`), with its hit rate. ``--no-flip`` drops the bundle's random
flip: without augmentation every later epoch is all hits; with it, a slice's flipped twin is
another image and is encoded the first time it is drawn.
``dataset``: ``dataset_cache_mb`` (:class:`fedfms.data.datasets.BoundedCacheDataset`) at the
bundle's cpu_demo image size, its strategy as shipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ignite.engine import Events

from common import peak_rss_mb, run_child
from fedfms.bundle import bundle_workflow

ROOT = Path(__file__).resolve().parents[1]


BUNDLE_DATA = {"flapsam_prostate": "demo/data_stack5", "fedmsa_prostate": "demo/data", "fedsam_prostate": "demo/data"}


def measure(cache: str, bundle: str, strategy: str | None, cache_mb: int, image_size: int | None, epochs: int, site: str, flip: bool) -> dict:
    overrides = {
        "dataset_dir": str(ROOT / BUNDLE_DATA[bundle]), "datalist_dir": "partitions/natural", "sites": site,
        "output_dir": "/tmp/bench_caches/models", "log_dir": "/tmp/bench_caches/logs",
        "max_epochs": epochs, "val_interval": epochs + 1, "num_workers": 0, f"{cache}_cache_mb": cache_mb,
        **({"strategy": strategy} if strategy else {}), **({"image_size": image_size} if image_size else {}),
    }
    if not flip:
        overrides["train#preprocessing#transforms"] = "@sample_transforms"
    start = time.perf_counter()
    workflow = bundle_workflow(ROOT / "bundles" / bundle, ["train.json", "cpu_demo.json"], "train", **overrides)
    trainer = workflow.trainer  # builds the datasets: a cache fills here
    setup = time.perf_counter() - start
    seconds, losses, started = [], [], []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: started.append(time.perf_counter()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: seconds.append(time.perf_counter() - started[-1]))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    trainer.run()
    cache = getattr(trainer.network, "embedding_cache", None)
    hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
    return {"setup_seconds": setup, "epoch_seconds": seconds, "losses": losses, "hits": hits, "misses": misses,
            "samples": len(trainer.data_loader.dataset), "peak_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", choices=("embedding", "dataset"))
    parser.add_argument("--bundle", default=None, help="default: flapsam_prostate (embedding), fedmsa_prostate (dataset)")
    parser.add_argument("--strategies", default=None, help="comma-separated; default: dec,pdec (embedding), the bundle's own (dataset)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 128 (embedding), the cpu_demo profile's (dataset)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--site", default="BMC")
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("STRATEGY", "CACHE_MB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    embedding = args.cache == "embedding"
    bundle = args.bundle or ("flapsam_prostate" if embedding else "fedmsa_prostate")
    image_size = args.image_size or (128 if embedding else None)
    if args.child:
        strategy, cache_mb = args.child
        print(json.dumps(measure(args.cache, bundle, None if strategy == "-" else strategy, int(cache_mb), image_size, args.epochs, args.site, not args.no_flip)))
        return
    common = [args.cache, "--bundle", bundle, "--epochs", str(args.epochs), "--site", args.site] + (["--image-size", str(image_size)] if image_size else [])
    common += ["--no-flip"] if args.no_flip else []
    print(f"torch threads: {torch.get_num_threads()}; {args.cache} cache, bundle {bundle} (cpu_demo), image {image_size or 'as profiled'} px, "
          f"site {args.site}, {args.epochs} epochs, random flip {'off' if args.no_flip else 'on'}")
    print(f"  {'strategy':<9}{'cache':>6}{'setup s':>9}  {'epoch seconds':<22}{'later epochs':>13}{'hit rate':>9}{'max |loss diff|':>16}{'peak MB':>9}")
    for strategy in (args.strategies or ("dec,pdec" if embedding else "-")).split(","):
        plain = run_child(__file__, ["--child", strategy, "0", *common])
        cached = run_child(__file__, ["--child", strategy, "1024", *common])
        later = lambda r: sum(r["epoch_seconds"][1:]) / max(len(r["epoch_seconds"]) - 1, 1)  # noqa: E731
        diff = max(abs(a - b) for a, b in zip(plain["losses"], cached["losses"]))
        for name, r in (("off", plain), ("on", cached)):
            epochs = " ".join(f"{s:.1f}" for s in r["epoch_seconds"])
            rate = f"{r['hits'] / (r['hits'] + r['misses']):.2f}" if embedding and r["hits"] + r["misses"] else "-"
            speedup = f"{later(plain) / later(r):.1f}x" if name == "on" else "1.0x"
            print(f"  {strategy:<9}{name:>6}{r['setup_seconds']:>9.1f}  {epochs:<22}{speedup:>13}{rate:>9}{(diff if name == 'on' else 0):>16.2e}{r['peak_mb']:>9.0f}")
        print(f"  ({plain['samples']} training samples per epoch)")


if __name__ == "__main__":
    main()
