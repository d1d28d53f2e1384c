"""Wall time of `make demo` against the 15-minute target on 2 cores, and FedMSA's final Dice against 0.85.

    .venv/bin/python benchmarks/bench_demo.py

Runs `make demo` from the repository root exactly as a user would (the virtual environment step is
a no-op when `.venv` is current), times it, checks that it printed a report for each of its two
jobs (FedMSA fine-tuning the packaged LiteMedSAM, then FM-instructed initialisation with its
pre-stage) with the per-site Dice table and the bytes exchanged, and prints the figures: among them
whether FedMSA's final average 3D test Dice reaches ``FEDMSA_TARGET_DICE``. The LiteMedSAM teacher's logits are
cached in ``demo/data_256/teacher_cache``: delete that folder (or ``demo``) to time a first run.
Everything `make demo` printed is kept in ``demo/make_demo.log``.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 15 * 60
FEDMSA_TARGET_DICE = 0.85  # final average 3D test Dice of the pretrained FM's federated fine-tuning
JOBS = ("fedmsa_prostate", "fminit_prostate")


def report_figures(report: str) -> dict:
    """The figures of one job's report, or an error naming what is missing."""
    found = {
        "average": re.search(r"^average\s+(\S+)\s+(\S+)\s+(\S+)", report, re.MULTILINE),
        "bytes": re.search(r"bytes sent in total .*: ([\d,]+)", report),
        "contributions": re.search(r"contributions: (\d+) expected: (\d+) accepted", report),
    }
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise SystemExit(f"a make demo report lacks {', '.join(missing)}:\n{report[-3000:]}")
    return found


def main() -> None:
    start = time.perf_counter()
    done = subprocess.run(["make", "demo"], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    (REPO / "demo").mkdir(exist_ok=True)
    (REPO / "demo" / "make_demo.log").write_text(done.stdout + done.stderr)  # the reports in full
    if done.returncode != 0:
        raise SystemExit(f"make demo failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    reports = re.split(r"^running jobs/", done.stdout, flags=re.MULTILINE)[1:]
    if [r.split(" ", 1)[0] for r in reports] != list(JOBS):
        raise SystemExit(f"make demo did not run {', '.join(JOBS)}:\n{done.stdout[-3000:]}")
    print(f"make demo: {elapsed:.0f} s (target {TARGET_S} s): {'met' if elapsed <= TARGET_S else 'NOT met'}")
    for job, report in zip(JOBS, reports):
        figures = report_figures(report)
        average, contributions = figures["average"], figures["contributions"]
        print(f"  {job}: final test average over sites: dice_2d {average[1]}, iou_2d {average[2]}, dice_3d {average[3]}")
        if job == "fedmsa_prostate":
            met = float(average[3]) >= FEDMSA_TARGET_DICE
            print(f"    3D Dice target {FEDMSA_TARGET_DICE}: {'met' if met else 'NOT met'}")
        print(f"    contributions: {contributions[1]} expected, {contributions[2]} accepted; bytes exchanged each way: {figures['bytes'][1]}")
    prestage = re.search(r"^teacher .*$\n^student: .*$", done.stdout, re.MULTILINE)
    if prestage is None:
        raise SystemExit(f"the fminit_prostate report lacks the pre-stage's figures:\n{done.stdout[-3000:]}")
    print("  " + prestage[0].replace("\n", "\n  "))


if __name__ == "__main__":
    main()
