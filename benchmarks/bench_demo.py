"""Wall time of `make demo`, against the 15-minute target on 2 cores.

    .venv/bin/python benchmarks/bench_demo.py

Runs `make demo` from the repository root exactly as a user would (the virtual environment step is
a no-op when `.venv` is current), times it, checks that the report it printed has the per-site
Dice table and the bytes exchanged, and prints the figures.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 15 * 60


def main() -> None:
    start = time.perf_counter()
    done = subprocess.run(["make", "demo"], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"make demo failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    out = done.stdout
    average = re.search(r"^average\s+(\S+)\s+(\S+)\s+(\S+)", out, re.MULTILINE)
    total_bytes = re.search(r"bytes sent in total .*: ([\d,]+)", out)
    contributions = re.search(r"contributions: (\d+) received, (\d+) rejected", out)
    if not (average and total_bytes and contributions):
        raise SystemExit(f"make demo's report lacks the Dice table or the bytes exchanged:\n{out[-3000:]}")
    print(f"make demo: {elapsed:.0f} s (target {TARGET_S} s): {'met' if elapsed <= TARGET_S else 'NOT met'}")
    print(f"  final test average over sites: dice_2d {average[1]}, iou_2d {average[2]}, dice_3d {average[3]}")
    print(f"  contributions: {contributions[1]} received, {contributions[2]} rejected; bytes exchanged each way: {total_bytes[1]}")


if __name__ == "__main__":
    main()
