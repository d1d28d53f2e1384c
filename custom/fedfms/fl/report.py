"""``fedfms report WS``: the tables a federated run wrote, and Dice per round per site as a PNG.

Tables: how the initial global model was made (FM-instructed-init jobs), the global model's
validation Dice per round and site with the contributions and bytes, and the final test scores.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from fedfms.errors import DataError
from fedfms.io import atomic_write, load_json

SERVER_APP = Path("server", "simulate_job", "app_server")
PRESTAGE = "prestage.json"  # written by fedfms.fl.fminit.FMInstructedInit


def server_app_dir(workspace: str | os.PathLike) -> Path:
    """The server app folder of a simulator workspace (or the folder itself if given directly)."""
    workspace = Path(workspace)
    for candidate in (workspace / SERVER_APP, workspace):
        if (candidate / "round_metrics.json").is_file():
            return candidate
    raise DataError(workspace, f"no round_metrics.json here or in {SERVER_APP}; is this the workspace of a fedfms job?")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def round_table(rows: list[dict]) -> str:
    """Global-model validation Dice per round (rows) and site (columns), plus bytes each site sent."""
    sites = sorted({r["site"] for r in rows})
    by_round: dict[int, dict[str, float]] = defaultdict(dict)
    for r in rows:
        by_round[r["round"]][r["site"]] = r["global_val_dice"]
    lines = ["global model validation Dice (scored at each site before local training)", "round  " + "".join(f"{s:>12}" for s in sites)]
    lines += [f"{rnd:<7}" + "".join(f"{_fmt(dice.get(s)):>12}" for s in sites) for rnd, dice in sorted(by_round.items())]
    rejected = [r for r in rows if not r["accepted"]]
    lines.append(f"contributions: {len(rows)} received, {len(rejected)} rejected")
    sent = defaultdict(list)
    for r in rows:
        sent[r["site"]].append(r["bytes_received"])
    lines.append("bytes sent per round: " + ", ".join(f"{s} {max(b):,}" for s, b in sorted(sent.items())))
    lines.append(f"bytes sent in total (all sites, all rounds, each way): {sum(sum(b) for b in sent.values()):,}")
    return "\n".join(lines)


def final_table(rows: list[dict]) -> str:
    title = "final global model on each site's test split"
    if any(str(r["site"]).startswith("unseen:") for r in rows):
        title += " (unseen: the site left out of training, not in the average)"
    lines = [title, f"{'site':<16}{'dice_2d':>10}{'iou_2d':>10}{'dice_3d':>10}"]
    lines += [f"{str(r['site']):<16}{_fmt(r.get('dice_2d')):>10}{_fmt(r.get('iou_2d')):>10}{_fmt(r.get('dice_3d')):>10}" for r in rows]
    return "\n".join(lines)


def prestage_table(record: dict) -> str:
    """How the initial global model was made (``prestage.json`` of the FM-instructed-init workflow)."""
    mode = record["mode"]
    if mode == "random":
        return "initial global model: random (the network as built; no pre-stage)"
    proxy, student = record["proxy"], record["student"]
    lines = [f"initial global model: {mode} pre-stage on the server's proxy set ({proxy['slices']} slices, {proxy['datalist']})"]
    teacher = record.get("teacher")
    if teacher:
        how = "reused from its cache" if teacher["cache_hit"] else f"computed in {teacher['seconds']} s"
        lines.append(
            f"teacher {teacher['kind']}: proxy Dice {_fmt(teacher['proxy_dice'])} on {proxy['foreground_slices']} slices with foreground "
            f"(logits {how}: {teacher['cache_file']})"
        )
    losses = student["epoch_loss"]
    lines.append(
        f"student: proxy Dice {_fmt(student['proxy_dice_before'])} -> {_fmt(student['proxy_dice'])} after {len(losses)} epochs "
        f"(loss {losses[0]:.4f} -> {losses[-1]:.4f}, {student['seconds']} s)"
    )
    return "\n".join(lines)


def plot_rounds(rows: list[dict], path: Path) -> None:
    """Dice per round, one line per site, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for site in sorted({r["site"] for r in rows}):
        points = sorted((r["round"], r["global_val_dice"]) for r in rows if r["site"] == site and r["global_val_dice"] is not None)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site)
    axis.set(xlabel="round", ylabel="validation Dice of the global model", ylim=(0, 1))
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def report(workspace: str | os.PathLike, png: str | os.PathLike | None = None) -> str:
    """The report text; also writes the Dice plot (default ``<server app>/dice_per_round.png``)."""
    folder = server_app_dir(workspace)
    rounds = load_json(folder / "round_metrics.json")
    text = [prestage_table(load_json(folder / PRESTAGE))] if (folder / PRESTAGE).is_file() else []
    text.append(round_table(rounds))
    if (folder / "final_test.json").is_file():
        text.append(final_table(load_json(folder / "final_test.json")))
    png = Path(png) if png else folder / "dice_per_round.png"
    plot_rounds(rounds, png)
    text.append(f"plot: {png}")
    return "\n\n".join(text)
