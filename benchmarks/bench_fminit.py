"""Random vs proxy pre-training vs FM-instructed initialisation of the same federation, as the paper compares them.

    .venv/bin/python benchmarks/bench_fminit.py [--rounds 10] [--partitions age,quantity] [--target-dice 0.7]

Needs the `make demo` data (``demo/data_256`` with its ``partitions/age`` and ``partitions/quantity``).
For every partition (age skew, quantity skew) and init mode (random, pretrain, fm) it writes a
configured copy of ``jobs/fminit_prostate`` with ``fedfms job`` (same data, partition, rounds and
local epochs; only the init mode differs), runs it in ``nvflare simulator`` on 3 sites, and reads
what the run recorded: the global model's validation Dice per round (mean over the sites, scored
at each site before local training, so round 0 is the initial model), the final model's 2D and
3D test Dice (mean over the sites), the pre-stage's proxy Dice, and the rounds needed for the mean
validation Dice to reach ``--target-dice`` (0 = the initial model already does). A run that does
not finish, or has a rejected contribution, stops the benchmark. The LiteMedSAM teacher's logits
are cached in ``demo/data_256/teacher_cache``, so only the first ``fm`` run pays for the teacher.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODES = ("random", "pretrain", "fm")
APP = Path("server/simulate_job/app_server")


def run(data: Path, partition: str, mode: str, rounds: int, work: Path) -> dict:
    """One federated run; returns its figures from the records it wrote."""
    job, workspace = work / f"job_{partition}_{mode}", work / f"ws_{partition}_{mode}"
    configure = [str(BIN / "fedfms"), "job", "jobs/fminit_prostate", "--out", str(job), "--dataset-dir", str(data)]
    configure += ["--datalist-dir", f"partitions/{partition}", "--init-mode", mode, "--num-rounds", str(rounds)]
    subprocess.run(configure, cwd=REPO, check=True, capture_output=True)
    start = time.perf_counter()
    done = subprocess.run([str(BIN / "nvflare"), "simulator", str(job), "-w", str(workspace), "-n", "3", "-t", "3"], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    app = workspace / APP
    if done.returncode != 0 or not (app / "final_test.json").is_file():
        raise SystemExit(f"{partition}/{mode}: the run failed (exit {done.returncode}); log:\n{(done.stdout + done.stderr)[-3000:]}")
    rows = json.loads((app / "round_metrics.json").read_text())
    if not all(r["accepted"] for r in rows):
        raise SystemExit(f"{partition}/{mode}: rejected contributions in {app / 'round_metrics.json'}")
    per_round = [sum(r["global_val_dice"] for r in rows if r["round"] == n) / len([r for r in rows if r["round"] == n]) for n in range(rounds)]
    final = {r["site"]: r for r in json.loads((app / "final_test.json").read_text())}["average"]
    prestage = json.loads((app / "prestage.json").read_text())
    return {"dice_per_round": per_round, "final": final, "prestage": prestage, "seconds": seconds}


def rounds_to(per_round: list[float], target: float) -> str:
    return next((str(n) for n, dice in enumerate(per_round) if dice >= target), f">{len(per_round) - 1}")


def table(partition: str, results: dict[str, dict], target: float) -> str:
    rounds = len(next(iter(results.values()))["dice_per_round"])
    lines = [f"\n{partition} skew: mean validation Dice of the global model at the start of each round (3 sites)"]
    lines.append(f"{'mode':<10}" + "".join(f"{'r' + str(n):>7}" for n in range(rounds)))
    lines += [f"{mode:<10}" + "".join(f"{d:>7.3f}" for d in r["dice_per_round"]) for mode, r in results.items()]
    lines.append(f"\n{'mode':<10}{'proxy Dice':>11}{'test 2D':>9}{'test 3D':>9}{f'rounds to {target}':>17}{'run s':>8}")
    for mode, r in results.items():
        proxy = r["prestage"].get("student", {}).get("proxy_dice")
        lines.append(
            f"{mode:<10}{'-' if proxy is None else f'{proxy:.3f}':>11}{r['final']['dice_2d']:>9.3f}{r['final']['dice_3d']:>9.3f}"
            f"{rounds_to(r['dice_per_round'], target):>17}{r['seconds']:>8.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "demo" / "data_256"), help="prepared data with partitions/<partition>")
    parser.add_argument("--partitions", default="age,quantity")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--target-dice", type=float, default=0.7)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    data = Path(args.data).resolve()
    for partition in args.partitions.split(","):
        if not (data / "partitions" / partition / "server_proxy.json").is_file():
            raise SystemExit(f"{data / 'partitions' / partition}: no partition with a proxy set; run `make demo` first")
    figures: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_fminit_") as work:
        for partition in args.partitions.split(","):
            figures[partition] = {}
            for mode in args.modes.split(","):
                figures[partition][mode] = run(data, partition, mode, args.rounds, Path(work))
                print(f"{partition}/{mode}: {figures[partition][mode]['seconds']:.0f} s", flush=True)
            print(table(partition, figures[partition], args.target_dice), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
