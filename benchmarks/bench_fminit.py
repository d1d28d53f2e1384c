"""Random vs proxy pre-training vs FM-instructed initialisation of the same federation, as the paper compares them.

    .venv/bin/python benchmarks/bench_fminit.py [--rounds 10] [--partitions age,quantity] [--modes random,pretrain,fm] [--target-dice 0.7]

A thin wrapper over the experiment runner: it runs ``fedfms experiment fminit`` (the shipped
``fminit`` experiment: ``jobs/fminit_prostate`` on ``demo/data_256``, partitions ``age`` and
``quantity``, init modes ``random``, ``pretrain`` and ``fm``, each a federated cell run through
``nvflare simulator``), writes its report, and prints the comparison per partition: the global
model's mean validation Dice per round (round 0 = the initial model), the pre-stage student's
proxy Dice, the final 2D and 3D test Dice (mean over the sites), the rounds until the mean
validation Dice reaches ``--target-dice`` and each run's seconds. Needs the ``make demo`` data.
Finished cells are kept in ``--out`` (default ``experiments/fminit``) and not run again; a
different ``--rounds`` runs them again. The LiteMedSAM teacher's logits are cached in
``demo/data_256/teacher_cache``, so only the first ``fm`` run pays for the teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedfms.experiment.config import load_config
from fedfms.experiment.report import write_report
from fedfms.experiment.runner import run_experiment
from fedfms.experiment.tables import rounds_to

MODES = ("random", "pretrain", "fm")


def table(partition: str, results: dict[str, dict], target: float) -> str:
    """The comparison of the init modes on one partition."""
    rounds = max(len(r.get("rounds", [])) for r in results.values())
    lines = [f"\n{partition} skew: mean validation Dice of the global model at the start of each round"]
    lines.append(f"{'mode':<10}" + "".join(f"{'r' + str(n):>7}" for n in range(rounds)))
    for mode, r in results.items():
        dice = {p["round"]: p["mean_global_val_dice"] for p in r.get("rounds", [])}
        lines.append(f"{mode:<10}" + "".join(f"{dice[n]:>7.3f}" if dice.get(n) is not None else f"{'-':>7}" for n in range(rounds)))
    lines.append(f"\n{'mode':<10}{'proxy Dice':>11}{'test 2D':>9}{'test 3D':>9}{f'rounds to {target}':>17}{'run s':>8}")
    for mode, r in results.items():
        proxy = (r.get("prestage") or {}).get("student_proxy_dice")
        series = [p["mean_global_val_dice"] for p in r.get("rounds", [])]
        reached = rounds_to(series, target)
        lines.append(
            f"{mode:<10}{'-' if proxy is None else f'{proxy:.3f}':>11}{r['average']['dice_2d']:>9.3f}{r['average']['dice_3d']:>9.3f}"
            f"{reached if reached is not None else f'>{len(series) - 1}':>17}{r['seconds']:>8.0f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--partitions", default="age,quantity")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--target-dice", type=float, default=0.7)
    parser.add_argument("--out", default="experiments/fminit", help="the experiment's output folder (finished cells are kept)")
    parser.add_argument("--json", help="also write every cell's result to this file")
    args = parser.parse_args()
    partitions, modes = args.partitions.split(","), args.modes.split(",")
    config = load_config("fminit", {"rounds": args.rounds})
    only = [f"{mode}_{partition}-federated" for partition in partitions for mode in modes]
    results = {r["cell"]["id"]: r for r in run_experiment(config, args.out, only)}
    write_report(args.out)
    failed = [cell for cell, r in results.items() if r["status"] != "ok"]
    for partition in partitions:
        done = {mode: results[f"{mode}_{partition}-federated"] for mode in modes if f"{mode}_{partition}-federated" not in failed}
        if done:
            print(table(partition, done, args.target_dice), flush=True)
    for cell, r in results.items():
        refused = {k: v for k, v in (r.get("contributions") or {}).items() if k != "accepted"}
        if refused:
            print(f"{cell}: contributions not accepted: {refused} (see {Path(args.out) / 'cells' / cell / 'ws'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if failed:
        print(f"failed: {', '.join(failed)} (reasons in {Path(args.out) / 'cells'}/<id>/result.json)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
