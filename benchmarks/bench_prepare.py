"""Benchmark ``fedfms prepare`` against the naive per-slice loop, on the default synthetic set.

    .venv/bin/python benchmarks/bench_prepare.py [--profile fedfms|flapsam|both] [--repeats R]

For each profile it synthesises the default set (6 sites x 6 cases), then times, each in a fresh
child process so peak memory (max RSS) is its own:

* ``prepare``: the package's pipeline (one vectorised resize and one gather per volume);
* ``naive``: load a volume, then per output slice: clip, rescale, resize and save every slice of
  its stack one at a time, as the papers' preparation scripts do.

Runs alternate between the two methods and each starts after ``os.sync()``, so neither pays for
the other's dirty pages; the fastest of ``--repeats`` runs counts. It prints volumes per second,
megabytes written, peak memory and the speed ratio, and the largest difference between the samples
training reads from the two: labels must match byte for byte, images are compared as loaded
(``prepare``'s default compact store writes an image smaller than the target size as it is, and
the loader resizes it as the naive loop did: equal within float32 rounding). ``--image-store resized`` times prepare writing every image at the target size.
Profiles: ``fedfms`` (single slices, image 1024, label 256) and ``flapsam`` (5-slice stacks with
all labels, 224).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Orientation, Resize, ScaleIntensityRange
from monai.transforms.utils_pytorch_numpy_unification import percentile

from common import peak_rss_mb, run_child
from fedfms.data.layouts import find_cases
from fedfms.data.prepare import PrepareOptions, prepare, split_cases
from fedfms.data.synthetic import synthesize_prostate
from fedfms.data.validation import check_case
from fedfms.io import load_volume, save_npy
from fedfms.transforms import stack_indices
from fedfms.transforms.stored import load_prepared_image

PROFILES = {
    "fedfms": PrepareOptions(num_slices=1, image_size=1024, label_size=256),
    "flapsam": PrepareOptions(num_slices=5, all_label_slices=True, image_size=224, label_size=224),
}


def naive_prepare(src: Path, out: Path, options: PrepareOptions) -> None:
    """The same samples as ``prepare``, computed slice by slice (no manifests, datalists or reuse)."""
    records = find_cases(src, options.layout)
    split_cases(records, options)  # same bookkeeping cost as the real run
    image_resize = Resize((options.image_size, options.image_size), mode="bilinear")
    label_resize = Resize((options.label_spatial_size,) * 2, mode="nearest")
    for record in records:
        image, label = load_volume(record.image), load_volume(record.label)
        check_case(record, image, label)
        orient = Orientation(axcodes=options.axcodes, labels=None)
        image, label = orient(image[None]), orient(label[None])
        low, high = percentile(image.as_tensor(), options.lower_percentile), percentile(image.as_tensor(), options.upper_percentile)
        scale = ScaleIntensityRange(a_min=float(low), a_max=float(high), b_min=0.0, b_max=1.0, clip=True)
        depth = image.shape[-1]
        for k, stack in enumerate(stack_indices(depth, options.num_slices)):
            slices = [image_resize(scale(image.as_tensor()[0, :, :, j]).unsqueeze(0))[0] for j in stack]
            label_ids = stack if options.all_label_slices else [k]
            labels = [label_resize(label.as_tensor()[0, :, :, j].clamp(max=1).unsqueeze(0))[0] for j in label_ids]
            name = f"{record.case}_{k:03d}.npy"
            save_npy(out / "images" / record.site / name, torch.stack(slices).numpy().astype(np.float32))
            save_npy(out / "labels" / record.site / name, torch.stack(labels).numpy().astype(np.uint8))


def measure(method: str, profile: str, src: Path, out: Path, image_store: str) -> dict:
    """Time one method in this (child) process and report its peak memory."""
    options = dataclasses.replace(PROFILES[profile], image_store=image_store)
    start = time.perf_counter()
    if method == "prepare":
        prepare(src, out, options, log=lambda _: None)
    else:
        naive_prepare(src, out, options)
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for kind in ("images", "labels") for p in (out / kind).rglob("*.npy"))
    return {"seconds": seconds, "peak_mb": peak_rss_mb(), "written_mb": written / 1e6}


def _spawn(method: str, profile: str, src: Path, out: Path, image_store: str) -> dict:
    args = ["--child", method, "--profile", profile, "--src", str(src), "--out", str(out), "--image-store", image_store]
    return run_child(__file__, args)


def _largest_difference(prepared: Path, naive: Path) -> float:
    """Largest |difference| between the samples training reads from two outputs (inf if any file or label differs).

    Labels must match byte for byte; images are compared as loaded (at their prepared size).
    """
    worst = 0.0
    for kind in ("labels", "images"):
        ours, theirs = (sorted(p.relative_to(root) for p in (root / kind).rglob("*.npy")) for root in (prepared, naive))
        if ours != theirs:
            return float("inf")
        for name in ours:
            if kind == "labels":
                worst = worst if (prepared / name).read_bytes() == (naive / name).read_bytes() else float("inf")
            else:
                worst = max(worst, float(np.abs(load_prepared_image(prepared / name) - np.load(naive / name)).max()))
    return worst


def bench_profile(profile: str, src: Path, work: Path, volumes: int, repeats: int, image_store: str) -> None:
    runs: dict[str, list[dict]] = {"prepare": [], "naive": []}
    for r in range(repeats):
        for method in runs:  # interleaved, so neither method always runs on a busier disk
            out = work / f"{method}{r}"
            os.sync()  # start every run without the previous runs' dirty pages still being flushed
            runs[method].append(_spawn(method, profile, src, out, image_store))
            if r > 0:
                shutil.rmtree(out)
    difference = _largest_difference(work / "prepare0", work / "naive0")
    best = {method: min(results, key=lambda x: x["seconds"]) for method, results in runs.items()}
    print(f"\nprofile {profile}: {dataclasses.replace(PROFILES[profile], image_store=image_store).content_options()}")
    for method, r in best.items():
        print(f"  {method:<8} {r['seconds']:7.2f} s  {volumes / r['seconds']:6.2f} volumes/s  "
              f"written {r['written_mb']:8.1f} MB  peak {r['peak_mb']:7.0f} MB")
    ratio = best["naive"]["seconds"] / best["prepare"]["seconds"]
    print(f"  speed-up prepare vs naive: {ratio:.2f}x   largest difference of the training input: {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=[*PROFILES, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest counts")
    parser.add_argument("--image-store", choices=("compact", "resized"), default="compact", help="prepare's image store (default: its own default)")
    parser.add_argument("--child", choices=("prepare", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.profile, args.src, args.out, args.image_store)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        src = Path(tmp) / "raw"
        pairs = synthesize_prostate(src)  # the default synthetic set
        print(f"default synthetic set: {len(pairs)} volumes; torch threads: {torch.get_num_threads()}")
        for profile in PROFILES if args.profile == "both" else [args.profile]:
            bench_profile(profile, src, Path(tmp) / profile, len(pairs), args.repeats, args.image_store)


if __name__ == "__main__":
    main()
