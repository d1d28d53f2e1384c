"""Forward+backward time per sample and peak memory of every fine-tuning strategy, on this CPU.

    .venv/bin/python benchmarks/bench_models.py [--configs small,vit_b] [--iters 3]

Configurations: ``small`` (the CPU size at 128 px, batch 4) and ``vit_b`` (ViT-B at 224, the
FLAP-SAM setting, batch 2), both with the FLAP-SAM decoder and random weights (speed does not
depend on them). Each strategy runs in its own process so its peak memory (VmHWM) is its own:
one warm-up step, then ``--iters`` timed steps of forward, loss and backward. Frozen encoders
(``dec``, ``pdec``) run without autograd state. Ratios are against ``full``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import peak_rss_mb, run_child
from fedfms.models import STRATEGIES, build_model, count_parameters

CONFIGS = {"small": ("small", 128, 4), "vit_b": ("vit_b", 224, 2)}  # size, image size, batch


def measure(config: str, strategy: str, iters: int) -> dict:
    size, image_size, batch = CONFIGS[config]
    torch.manual_seed(0)
    model = build_model("flapsam", strategy, size, image_size, num_classes=1, lora_init="default")
    x = torch.rand(batch, 1, image_size, image_size)
    target = (torch.rand(batch, image_size, image_size) > 0.5).long()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()

    step()  # warm-up: allocator and kernels
    start = time.perf_counter()
    for _ in range(iters):
        step()
    seconds = (time.perf_counter() - start) / (iters * batch)
    return {"seconds_per_sample": seconds, "peak_mb": peak_rss_mb(), "trainable": count_parameters(model).trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,vit_b", help="comma-separated: small, vit_b")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.iters)))
        return
    print(f"torch threads: {torch.get_num_threads()}")
    for config in args.configs.split(","):
        size, image_size, batch = CONFIGS[config]
        print(f"\n{config}: FLAP-SAM decoder, size {size}, image {image_size}, batch {batch}")
        print(f"  {'strategy':<10}{'trainable':>13}{'s/sample':>10}{'vs full':>9}{'peak MB':>9}")
        results = {s: run_child(__file__, ["--child", config, s, "--iters", str(args.iters)]) for s in STRATEGIES}
        full = results["full"]["seconds_per_sample"]
        for strategy, r in results.items():
            print(
                f"  {strategy:<10}{r['trainable']:>13,}{r['seconds_per_sample']:>10.3f}"
                f"{r['seconds_per_sample'] / full:>8.2f}x{r['peak_mb']:>9.0f}"
            )


if __name__ == "__main__":
    main()
