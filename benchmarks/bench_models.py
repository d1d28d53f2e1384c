"""Forward+backward time per sample and peak memory of every fine-tuning strategy, on this CPU.

    .venv/bin/python benchmarks/bench_models.py [--configs small,vit_b,lite128,lite256,teacher] [--iters 3] [--amp]

Configurations: ``small`` (the CPU size at 128 px, batch 4), ``vit_b`` (ViT-B at 224, the FLAP-SAM
setting, batch 2), ``lite128`` and ``lite256`` (LiteMedSAM's TinyViT at 128 and 256 px, batch 2
and 1), all with the FLAP-SAM decoder and random weights (speed does not depend on them). Each
strategy runs in its own process so its peak memory (VmHWM) is its own: one warm-up step, then
``--iters`` timed steps of forward, loss and backward. Frozen encoders (``dec``, ``pdec``) run
without autograd state. Ratios are against ``full``. ``teacher`` times the pretrained LiteMedSAM
teacher (packaged weights, box prompt, 256 px, one slice per call) per slice, as the FM-instructed
pre-stage runs it, in float32 and with its encoder in bf16 (``precision``). ``--amp`` also times every strategy under bf16 autocast (the bundles' ``amp``
option on a CPU, :class:`fedfms.inferers.AutocastInferer`) and prints its ratio to float32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import peak_rss_mb, run_child
from monai.inferers import SimpleInferer

from fedfms.inferers import AutocastInferer
from fedfms.models import STRATEGIES, build_model, count_parameters
from fedfms.models.teacher import PRECISIONS, build_teacher, fastest_precision

CONFIGS = {"small": ("small", 128, 4), "vit_b": ("vit_b", 224, 2), "lite128": ("lite", 128, 2), "lite256": ("lite", 256, 1)}  # size, image size, batch
TEACHER = "teacher"


def measure(config: str, strategy: str, iters: int, amp: bool = False) -> dict:
    size, image_size, batch = CONFIGS[config]
    torch.manual_seed(0)
    model = build_model("flapsam", strategy, size, image_size, num_classes=1, lora_init="default")
    x = torch.rand(batch, 1, image_size, image_size)
    target = (torch.rand(batch, image_size, image_size) > 0.5).long()
    infer = AutocastInferer() if amp else SimpleInferer()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(infer(x, model), target).backward()

    step()  # warm-up: allocator and kernels
    start = time.perf_counter()
    for _ in range(iters):
        step()
    seconds = (time.perf_counter() - start) / (iters * batch)
    return {"seconds_per_sample": seconds, "peak_mb": peak_rss_mb(), "trainable": count_parameters(model).trainable}


def measure_teacher(iters: int, precision: str) -> dict:
    """Seconds per slice of the LiteMedSAM teacher on 256 px slices with a box, after one warm-up slice."""
    torch.manual_seed(0)
    teacher = build_teacher("litemedsam", precision=precision)
    image = torch.rand(1, 1, 256, 256)
    label = torch.zeros(1, 1, 256, 256)
    label[..., 90:170, 80:180] = 1
    teacher(image, label)
    start = time.perf_counter()
    for _ in range(iters):
        teacher(image, label)
    return {"seconds_per_slice": (time.perf_counter() - start) / iters, "peak_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,vit_b,lite128,lite256,teacher", help=f"comma-separated: {', '.join([*CONFIGS, TEACHER])}")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="also time each strategy under bf16 autocast")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, strategy = args.child
        print(json.dumps(measure_teacher(args.iters, strategy) if config == TEACHER else measure(config, strategy, args.iters, args.amp)))
        return
    print(f"torch threads: {torch.get_num_threads()}")
    for config in args.configs.split(","):
        if config == TEACHER:
            print("\nteacher: LiteMedSAM (packaged weights), 256 px, box prompt, one slice per call")
            timed = {p: run_child(__file__, ["--child", TEACHER, p, "--iters", str(args.iters)]) for p in PRECISIONS}
            for precision, r in timed.items():
                ratio = timed["float32"]["seconds_per_slice"] / r["seconds_per_slice"]
                print(f"  {precision:<9} {r['seconds_per_slice']:6.2f} s/slice  {ratio:5.2f}x  peak {r['peak_mb']:.0f} MB")
            print(f"  (this CPU's default, precision auto: {fastest_precision('cpu')})")
            continue
        size, image_size, batch = CONFIGS[config]
        print(f"\n{config}: FLAP-SAM decoder, size {size}, image {image_size}, batch {batch}")
        amp_header = f"{'bf16 s/sample':>14}{'fp32/bf16':>10}" if args.amp else ""
        print(f"  {'strategy':<10}{'trainable':>13}{'s/sample':>10}{'vs full':>9}{'peak MB':>9}{amp_header}")
        results = {s: run_child(__file__, ["--child", config, s, "--iters", str(args.iters)]) for s in STRATEGIES}
        amp = {s: run_child(__file__, ["--child", config, s, "--iters", str(args.iters), "--amp"]) for s in STRATEGIES} if args.amp else {}
        full = results["full"]["seconds_per_sample"]
        for strategy, r in results.items():
            bf16 = amp[strategy]["seconds_per_sample"] if amp else None
            amp_cells = f"{bf16:>14.3f}{r['seconds_per_sample'] / bf16:>9.2f}x" if amp else ""
            print(
                f"  {strategy:<10}{r['trainable']:>13,}{r['seconds_per_sample']:>10.3f}"
                f"{r['seconds_per_sample'] / full:>8.2f}x{r['peak_mb']:>9.0f}{amp_cells}"
            )


if __name__ == "__main__":
    main()
