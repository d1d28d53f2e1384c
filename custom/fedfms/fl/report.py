"""``fedfms report WS``: the tables a federated run wrote, and Dice per round per site as a PNG.

Tables: how the initial global model was made (FM-instructed-init jobs), how the run ended, the
global model's validation Dice per round and site (MONAI MeanDice: slices with organ only), every
contribution that was not accepted and why, the bytes exchanged, and the final test scores (with
the rule of each column under the title). A run without final test scores is reported as
incomplete (:class:`IncompleteRun`, a non-zero exit of ``fedfms report``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from fedfms.errors import DataError
from fedfms.io import atomic_write, load_json

SERVER_APP = Path("server", "simulate_job", "app_server")  # in a simulator workspace
DOWNLOADED_APP = Path("workspace", "app_server")  # in a downloaded job result
PRESTAGE = "prestage.json"  # written by fedfms.fl.workflows.fminit.FMInstructedInit
RUN_STATUS = "run_status.json"  # written by fedfms.fl.widgets.recorder.ContributionRecorder
FINISHED = ("completed", "stopped_early")  # how a run that did its work ends: every round, or early on purpose (patience)
FINAL_TEST = "final_test.json"
BEST = "best_model.json"  # written by fedfms.fl.widgets.selector.ResumableModelSelector
STATUS_ORDER = ("accepted", "rejected", "failed", "timed_out", "lost", "late")
# Validation is the bundles' dice_metric: MONAI MeanDice with its default ignore_empty=True.
VALIDATION_RULE = "MONAI MeanDice over the validation slices with organ: empty-label slices are ignored"
FINAL_COLUMNS = {  # key in final_test.json -> column heading
    "dice_2d": "dice_2d", "iou_2d": "iou_2d", "dice_3d": "dice_3d", "dice_2d_fg": "dice_2d_fg", "fp_rate_empty": "fp_empty", "hd95_3d": "hd95",
}
FINAL_RULES = (
    "dice_2d, iou_2d: all slices, empty-slice rule (empty label: 1 if nothing predicted, else 0); dice_3d: per volume, same rule",
    "dice_2d_fg: slices with organ only; fp_empty: share of empty slices with predicted foreground",
    "hd95: 95th-percentile Hausdorff distance per volume, pixels of the prepared label grid (not mm), "
    "volumes with an empty label or prediction left out",
    "- : no value (e.g. fp_empty of a site without empty slices); average: over the sites with a value",
)


class IncompleteRun(Exception):
    """The run has no final test table; the message is the report written so far."""


def server_app_dir(workspace: str | os.PathLike) -> Path:
    """The server app folder of a run, given any of the folders users have at hand.

    A simulator workspace (``WS/server/simulate_job/app_server``), a job result downloaded with
    ``nvflare job download`` or the FLARE API (``<download>/<job id>/workspace/app_server``, given
    as ``<download>/<job id>`` or as ``<download>`` when it holds one job), or the app folder itself.
    """
    workspace = Path(workspace)
    candidates = [workspace / SERVER_APP, workspace / DOWNLOADED_APP, workspace / "app_server", workspace]
    found = [c for c in candidates if (c / "round_metrics.json").is_file()]
    if found:
        return found[0]
    downloaded = sorted(p.parent for p in workspace.glob(f"*/{DOWNLOADED_APP}/round_metrics.json"))
    if len(downloaded) == 1:
        return downloaded[0]
    if downloaded:
        jobs = ", ".join(p.parents[1].name for p in downloaded)
        raise DataError(workspace, f"holds the results of several jobs ({jobs}); give the one to report, e.g. {downloaded[0].parents[1]}")
    raise DataError(workspace, f"no round_metrics.json here, in {SERVER_APP} (simulator) or in <job id>/{DOWNLOADED_APP} (downloaded job); is this a fedfms run?")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def round_table(rows: list[dict]) -> str:
    """Global-model validation Dice per round (rows) and site (columns), plus bytes each site sent."""
    sites = sorted({r["site"] for r in rows})
    by_round: dict[int, dict[str, float]] = defaultdict(dict)
    for r in rows:
        by_round[r["round"]][r["site"]] = r["global_val_dice"]
    lines = [f"global model validation Dice (scored at each site before local training; {VALIDATION_RULE})", "round  " + "".join(f"{s:>12}" for s in sites)]
    lines += [f"{rnd:<7}" + "".join(f"{_fmt(dice.get(s)):>12}" for s in sites) for rnd, dice in sorted(by_round.items())]
    counts = defaultdict(int)
    for r in rows:
        counts[row_status(r)] += 1
    lines.append(f"contributions: {len(rows)} expected: " + ", ".join(f"{counts[s]} {s.replace('_', ' ')}" for s in STATUS_ORDER))
    lines += [f"  round {r['round']} {r['site']}: {row_status(r).replace('_', ' ')}: {r.get('reason')}" for r in rows if row_status(r) != "accepted"]
    lines += never_contributed(rows)
    sent = defaultdict(list)
    for r in rows:
        sent[r["site"]].append(r["bytes_received"])
    lines.append("bytes sent per round: " + ", ".join(f"{s} {max(b):,}" for s, b in sorted(sent.items())))
    lines.append(f"bytes sent in total (all sites, all rounds, each way): {sum(sum(b) for b in sent.values()):,}")
    lines += wire_lines(rows)
    return "\n".join(lines)


def wire_lines(rows: list[dict]) -> list[str]:
    """The payload each site measured on the wire (serialised by NVFlare's FOBS), largest per round, each way."""
    measured = [r for r in rows if r.get("wire_bytes_up") is not None]
    if not measured:
        return []
    largest: dict[str, tuple[int, int, int]] = {}
    for r in measured:
        down, up, tensors = largest.get(r["site"], (0, 0, 0))
        largest[r["site"]] = (max(down, r.get("wire_bytes_down") or 0), max(up, r["wire_bytes_up"]), max(tensors, r.get("bytes_received") or 0))
    return ["on the wire per round, as serialised (down to the site / up from it; up against the update's tensor bytes: "
            "about 1 uncompressed, 0.5 fp16, 0.25 8-bit): " + ", ".join(
                f"{site} {down:,} / {up:,}" + (f" ({up / tensors:.3f})" if tensors else "") for site, (down, up, tensors) in sorted(largest.items())
            )]


def never_contributed(rows: list[dict]) -> list[str]:
    """One line per site that had tasks but no update accepted in any round, with its last reason."""
    sites = sorted({r["site"] for r in rows} - {r["site"] for r in rows if row_status(r) == "accepted"})
    if not sites:
        return []
    last = {r["site"]: r for r in sorted(rows, key=lambda r: r["round"])}
    return [f"NEVER CONTRIBUTED: {len(sites)} site(s) had no update accepted in any round; the model was trained without them"] + [
        f"  {site}: {row_status(last[site]).replace('_', ' ')} in round {last[site]['round']}: {last[site].get('reason')}" for site in sites
    ]


def row_status(row: dict) -> str:
    """A ``round_metrics`` row's status (records written before statuses existed only say whether it was accepted)."""
    return row.get("status") or ("accepted" if row["accepted"] else "rejected")


def run_status_line(folder: Path) -> str:
    """How the run ended, from ``run_status.json``; a run without one stopped before FedAvg could say."""
    if not (folder / RUN_STATUS).is_file():
        return "run: no run_status.json: the server stopped before FedAvg ended (see the server log)"
    status = load_json(folder / RUN_STATUS)
    words = {"completed": "completed", "stopped_early": "stopped early", "ended_early": "ENDED EARLY", "aborted": "ABORTED"}
    return f"run {words.get(status['status'], status['status'])}: {status.get('reason') or ''}".rstrip(": ")


def algorithm_line(folder: Path) -> str | None:
    """The federated algorithm the run used and its settings, read from the server app's own configs (None without them)."""
    configs = {name: folder / "config" / f"config_fed_{name}.json" for name in ("server", "client")}
    if not configs["server"].is_file():
        return None
    workflow = next((w for w in load_json(configs["server"])["workflows"] if w["path"].endswith(("FedAvg", "FedOpt", "Scaffold"))), None)
    if workflow is None:
        return None
    args, name = workflow["args"], workflow["path"].rsplit(".", 1)[1]
    client = load_json(configs["client"]) if configs["client"].is_file() else {"components": []}
    learner = next((c["args"] for c in client["components"] if "bundle_root" in c.get("args", {})), {})
    if name == "ResumableFedOpt":
        optimizer = args.get("optimizer", "torch.optim.SGD").rsplit(".", 1)[1]
        text = f"fedopt (server optimiser {optimizer} " + ", ".join(f"{k} {v}" for k, v in (args.get("optimizer_args") or {"lr": 1.0}).items()) + ")"
    elif name == "ResumableScaffold":
        text = "scaffold (control variates)"
    elif learner.get("ditto_lambda") is not None:
        text = f"ditto (lambda {learner['ditto_lambda']}: each site also trains a personal model)"
    elif args.get("fedprox_mu") is not None:
        text = f"fedprox (mu {args['fedprox_mu']})"
    else:
        text = "fedavg"
    if learner.get("norm_statistics") == "local":
        text += " with FedBN (normalisation layers kept at the sites)"
    stop = f"; early stopping after {args['patience']} rounds without a better mean validation Dice" if args.get("patience") else ""
    return f"algorithm: {text}{stop}"


def best_model_line(folder: Path) -> str | None:
    """Which global model ``best_FL_global_model.pt`` holds and its mean validation Dice, beside the final model's (None without a record)."""
    if not (folder / BEST).is_file():
        return None
    best = load_json(folder / BEST)
    final = best.get("final_model")
    text = f"best global model: the one sent in round {best['round']}, mean validation Dice {best['metric']:.4f}"
    if final:
        text += f"; the final model (after {final['round']} rounds) scored {final['metric']:.4f}" + (", so it is the best" if final["round"] == best["round"] else "")
    return text


def final_table(rows: list[dict]) -> str:
    """The final test scores per site; the lines under the title state the rule of every column.

    Rows written before a column existed show it as "-".
    """
    title = "final global model on each site's test split"
    if any(str(r["site"]).startswith("personalised:") for r in rows):
        title += " (personalised: each site's own model, Ditto's or FedBN's, on the same split)"
    if any(str(r["site"]).startswith("unseen:") for r in rows):
        title += " (unseen: the site left out of training, not in the average)"
    lines = [title, *(f"  {rule}" for rule in FINAL_RULES), f"{'site':<16}" + "".join(f"{h:>12}" for h in FINAL_COLUMNS.values())]
    for r in rows:
        note = f"  {r['note']}" if r.get("note") else ""
        lines.append(f"{str(r['site']):<16}" + "".join(f"{_fmt(r.get(k)):>12}" for k in FINAL_COLUMNS) + note)
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
    axis.set(xlabel="round", ylabel="validation Dice of the global model\n(slices with organ)", ylim=(0, 1))
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def report(workspace: str | os.PathLike, png: str | os.PathLike | None = None) -> str:
    """The report text; also writes the Dice plot (default ``<server app>/dice_per_round.png``).

    Raises:
        IncompleteRun: there is no final test table; its message is the report without it.
    """
    folder = server_app_dir(workspace)
    rounds = load_json(folder / "round_metrics.json")
    text = [prestage_table(load_json(folder / PRESTAGE))] if (folder / PRESTAGE).is_file() else []
    text += [line for line in (algorithm_line(folder),) if line]
    text.append(run_status_line(folder))
    text.append(round_table(rounds))
    png = Path(png) if png else folder / "dice_per_round.png"
    plot_rounds(rounds, png)
    if not (folder / FINAL_TEST).is_file():
        text.append(f"no final test scores ({folder / FINAL_TEST}): the run did not reach its final evaluation")
        raise IncompleteRun("\n\n".join(text))
    text.append(final_table(load_json(folder / FINAL_TEST)))
    text += [line for line in (best_model_line(folder),) if line]
    text.append(f"plot: {png}")
    return "\n\n".join(text)
