"""One cell of an experiment, run as the real thing in a process of its own: ``python -m fedfms.experiment.cell CELL.json``.

- ``local``: one model per training site, trained on that site alone and tested on its own
  test split;
- ``centralized``: one model trained on the training sites pooled, tested on each site;
- ``federated``: ``fedfms job`` (:func:`fedfms.fl.job_config.configure_job`) then ``nvflare
  simulator`` with the training sites; the final global model's ``final_test.json``;
- ``loso``: the same on a leave-one-site-out partition with its unseen site as an
  evaluate-only participant, whose row is kept as ``unseen``.

Local and centralized training run the bundle's own workflow (:func:`fedfms.bundle.bundle_workflow`,
what ``python -m monai.bundle run`` builds) for ``train_epochs``, and the LAST model is tested
(:func:`fedfms.bundle.evaluate_checkpoint`), as the federated final evaluation scores the last
global model. A federated run is judged by its records (``run_status.json``, ``final_test.json``),
never by the simulator's exit code, which can be 0 for a failed run.

The process writes ``result.json`` beside ``CELL.json`` atomically, ``status`` ``ok`` or
``failed`` with the ``reason``; its output (and the simulator's) goes to the log the runner gave
it. It also keeps, per site, the predictions of the test slices with the largest label area
(``qualitative/<site>.npz``: image, label, prediction), so the report draws them without a model.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean

import numpy as np

from fedfms.errors import DataError
from fedfms.fl.report import BEST, FINISHED, row_status
from fedfms.io import atomic_write, load_json, save_json

CELL_FILE = "cell.json"
RESULT = "result.json"
LOG = "log.txt"
QUALITATIVE = "qualitative"
SITE_SETTINGS = "site_settings.json"
APP = Path("server", "simulate_job", "app_server")
SCHEMA = 1
# As fedfms.bundle.TEST_METRICS; repeated so that reading results needs no torch.
TEST_METRICS = ("dice_2d", "iou_2d", "dice_3d", "dice_2d_fg", "fp_rate_empty", "hd95_3d")


# ---- data and bundle settings -------------------------------------------------------------


def partition_folder(cell: dict) -> Path:
    return Path(cell["data"]) / cell["partition"]


def training_sites(cell: dict) -> list[str]:
    """The sites that train: the cell's, or every client datalist of its partition; checked against the partition."""
    from fedfms.data.partition import client_datalists

    data, folder = Path(cell["data"]), partition_folder(cell)
    if not data.is_dir():
        raise DataError(data, "no prepared data folder here (data); run `fedfms prepare` (or `make demo`) or fix the experiment file")
    available = client_datalists(folder)
    if not available:
        raise DataError(folder, "holds no partition (no <site>.json datalists); run `fedfms partition` or choose another partition")
    unknown = sorted(set(cell["sites"] or []) - set(available))
    if unknown:
        raise DataError(folder, f"no datalist for site(s) {', '.join(unknown)}; available: {', '.join(available)}")
    return list(cell["sites"] or available)


def network_overrides(cell: dict) -> dict:
    """The bundle keys that choose a SAM network (the same ones ``fedfms job`` sets); none for the U-Nets."""
    if cell["model"] not in ("sam", "flapsam"):
        return {}
    overrides = {"strategy": cell["strategy"], "size": cell["size"], "image_size": cell["image_size"]}
    if not cell["pretrained"]:
        overrides["pretrained_checkpoint"] = "scratch"
    elif cell["pretrained_checkpoint"]:
        overrides["pretrained_checkpoint"] = cell["pretrained_checkpoint"]
    return {k: v for k, v in overrides.items() if v is not None}


def bundle_overrides(cell: dict) -> dict:
    """Every bundle override of a local or centralized cell: data, partition, seed, network, device."""
    device = {"device": f"$torch.device({cell['device']!r})"} if cell["device"] else {}
    chosen = {"dataset_dir": cell["data"], "datalist_dir": cell["partition"], "seed": cell["seed"], **network_overrides(cell), **device}
    return {**cell.get("overrides", {}), **chosen}


def scoring_overrides(cell: dict) -> dict:
    """Overrides for networks whose every weight comes from a checkpoint: no pretrained weights to load first."""
    return {**bundle_overrides(cell), "pretrained_checkpoint": "scratch"}


# ---- local and centralized ----------------------------------------------------------------


def train(cell: dict, folder: Path, sites: str | list[str]) -> Path:
    """Train the bundle on ``sites`` for ``train_epochs``; returns the last model (``model_last.pt``)."""
    from fedfms.bundle import bundle_workflow

    print(f"training {cell['bundle']} on {sites} for {cell['train_epochs']} epochs -> {folder}", flush=True)
    workflow = bundle_workflow(
        cell["bundle"], cell["config_files"], "train", **bundle_overrides(cell), sites=sites,
        max_epochs=cell["train_epochs"], output_dir=str(folder), log_dir=str(folder / "logs"),
    )
    try:
        workflow.run()
    finally:
        workflow.finalize()
    last = folder / "model_last.pt"
    if not last.is_file():
        raise DataError(last, "training ended without saving its last model")
    return last


def evaluate(cell: dict, checkpoint: Path, eval_dir: Path, sites: str | list[str]) -> dict[str, dict]:
    """Test ``checkpoint`` on the test split of ``sites``; per-site TEST_METRICS (None where undefined)."""
    from fedfms.bundle import evaluate_checkpoint

    evaluate_checkpoint(cell["bundle"], cell["config_files"], checkpoint, eval_dir, **scoring_overrides(cell), sites=sites)
    summary = load_json(eval_dir / "summary.json")
    return {site: {k: values.get(k) for k in TEST_METRICS} for site, values in summary["sites"].items()}


def run_local(cell: dict, out: Path) -> dict:
    """One model per training site, each tested on its own site."""
    scores, qualitative = {}, {}
    for site in training_sites(cell):
        model = train(cell, out / "models" / site, site)
        scores[site] = evaluate(cell, model, out / "eval" / site, site)[site]
        qualitative.update(save_qualitative(cell, model, {site: site}, out))
    return {"sites": scores, "qualitative": qualitative}


def run_centralized(cell: dict, out: Path) -> dict:
    """One model on the training sites pooled, tested on each of them."""
    sites = training_sites(cell)
    model = train(cell, out / "models" / "pooled", sites)
    scores = evaluate(cell, model, out / "eval", sites)
    return {"sites": {s: scores[s] for s in sites}, "qualitative": save_qualitative(cell, model, {s: s for s in sites}, out)}


# ---- federated ----------------------------------------------------------------------------


def job_options(cell: dict, sites: list[str], unseen: str | None):
    """The ``fedfms job`` options of a federated cell: the same data, partition, network and seed as the others."""
    from fedfms.fl.job_config import JobOptions

    network = {}
    if cell["model"] in ("sam", "flapsam"):
        network = {"strategy": cell["strategy"], "size": cell["size"], "image_size": cell["image_size"], "pretrained": cell["pretrained"]}
        if cell["pretrained"] and cell["pretrained_checkpoint"]:
            network["pretrained_checkpoint"] = cell["pretrained_checkpoint"]
    return JobOptions(
        profile=cell["profile"], dataset_dir=cell["data"], datalist_dir=cell["partition"], num_rounds=cell["rounds"],
        local_epochs=cell["epochs"], seed=cell["seed"], init_mode=cell["init_mode"], prestage_epochs=cell["prestage_epochs"],
        task_timeout=cell["task_timeout"], evaluate_only=[unseen] if unseen else None,
        min_clients=1 if len(sites) == 1 else None, overrides=cell.get("overrides") or None, compress=cell.get("compress"),
        algorithm=cell.get("algorithm"), **(cell.get("algorithm_options") or {}), **network,
    )


def simulator() -> str:
    """The ``nvflare`` command of this Python environment."""
    beside = Path(sys.executable).with_name("nvflare")
    found = str(beside) if beside.is_file() else shutil.which("nvflare")
    if not found:
        raise FileNotFoundError("no `nvflare` command beside this Python or on PATH; install nvflare (pip install -e .)")
    return found


def run_federated(cell: dict, out: Path) -> dict:
    """``fedfms job`` + ``nvflare simulator`` on the training sites (and the unseen one for ``loso``)."""
    from fedfms.data.partition import UNSEEN, unseen_site
    from fedfms.fl.job_config import configure_job

    sites = training_sites(cell)
    unseen = unseen_site(partition_folder(cell)) if cell["setting"] == "loso" else None
    if cell["setting"] == "loso" and not unseen:
        raise DataError(partition_folder(cell), "not a leave-one-site-out partition (no unseen.json); run `fedfms partition --method loso --unseen SITE`")
    job = configure_job(cell["job"], out / "job", job_options(cell, sites, unseen))
    participants = sites + ([unseen] if unseen else [])
    threads = min(cell["threads"] or len(participants), len(participants))
    command = [simulator(), "simulator", str(job), "-w", str(out / "ws"), "-c", ",".join(participants), "-t", str(threads)]
    print("running: " + " ".join(command), flush=True)
    code = subprocess.run(command, cwd=out, env=simulator_env(cell, out)).returncode
    app = out / "ws" / APP
    rows = federated_rows(app, code, sites, unseen)
    result = {"sites": {s: rows[s] for s in sites}, **round_records(app)}
    if unseen:
        result["unseen"] = {unseen: rows[f"unseen:{unseen}"]}
    if (app / "prestage.json").is_file():
        result["prestage"] = prestage_summary(load_json(app / "prestage.json"))
    datalists = {**{s: s for s in sites}, **({unseen: UNSEEN} if unseen else {})}
    result["qualitative"] = save_qualitative(cell, app / "FL_global_model.pt", datalists, out)
    return result


def simulator_env(cell: dict, out: Path) -> dict:
    """The simulator's environment: every site's device through a site settings file, when the experiment sets one."""
    env = dict(os.environ)
    if cell["device"]:
        from fedfms.fl.site_settings import SETTINGS_ENV

        save_json(out / SITE_SETTINGS, {"device": cell["device"]})
        env[SETTINGS_ENV] = str(out / SITE_SETTINGS)
    return env


def federated_rows(app: Path, code: int, sites: list[str], unseen: str | None) -> dict[str, dict]:
    """The final test rows by site, once the records show a completed run that every site scored."""
    status_file, final_file = app / "run_status.json", app / "final_test.json"
    if not status_file.is_file():
        raise RuntimeError(f"the federated run stopped before FedAvg ended (no {status_file}; nvflare simulator exited with {code}); see the log")
    status = load_json(status_file)
    if status.get("status") not in FINISHED:
        raise RuntimeError(f"the federated run did not complete: {status.get('status')}: {status.get('reason') or ''} ({status_file})")
    if not final_file.is_file():
        raise RuntimeError(f"no final test table {final_file}: the run did not reach its final evaluation (nvflare simulator exited with {code})")
    rows = {r["site"]: {k: r.get(k) for k in (*TEST_METRICS, "note")} for r in load_json(final_file)}
    expected = sites + ([f"unseen:{unseen}"] if unseen else [])
    missing = [s for s in expected if s not in rows or all(rows[s].get(k) is None for k in TEST_METRICS)]
    if missing:
        notes = "; ".join(f"{s}: {rows.get(s, {}).get('note') or 'no row'}" for s in missing)
        raise RuntimeError(f"the final global model was not scored at {', '.join(missing)} ({notes}; {final_file})")
    return {s: {k: rows[s].get(k) for k in TEST_METRICS} for s in expected}


def round_records(app: Path) -> dict:
    """Per round, the global model's mean validation Dice over the sites (the final model's last); bytes per round; contributions by status."""
    rows = load_json(app / "round_metrics.json")
    dice = defaultdict(list)
    for r in rows:
        if r.get("global_val_dice") is not None:
            dice[r["round"]].append(r["global_val_dice"])
    final = (load_json(app / BEST) if (app / BEST).is_file() else {}).get("final_model")
    if final and final.get("sites"):  # the final model, scored after the rounds by the final evaluation
        dice[final["round"]] = list(final["sites"].values())
    accepted_rows = [r for r in rows if row_status(r) == "accepted"]
    accepted = [r["bytes_received"] for r in accepted_rows]
    wire_up = [r["wire_bytes_up"] for r in accepted_rows if r.get("wire_bytes_up") is not None]
    wire_down = [r["wire_bytes_down"] for r in accepted_rows if r.get("wire_bytes_down") is not None]
    statuses: dict[str, int] = defaultdict(int)
    for r in rows:
        statuses[row_status(r)] += 1
    return {
        "rounds": [{"round": n, "mean_global_val_dice": fmean(v), "sites": len(v)} for n, v in sorted(dice.items())],
        "bytes_per_round": fmean(accepted) if accepted else None,
        "bytes_total": sum(r["bytes_received"] for r in rows),
        "wire_bytes_up_per_round": fmean(wire_up) if wire_up else None,  # measured: the update as serialised by the site
        "wire_bytes_down_per_round": fmean(wire_down) if wire_down else None,  # measured: the global model as it arrived
        "contributions": dict(statuses),
        "run_status": load_json(app / "run_status.json"),
    }


def prestage_summary(record: dict) -> dict:
    """What the report needs of ``prestage.json``: the init mode and the proxy Dice of the student (and teacher)."""
    return {
        "mode": record.get("mode"),
        "student_proxy_dice": (record.get("student") or {}).get("proxy_dice"),
        "teacher_proxy_dice": (record.get("teacher") or {}).get("proxy_dice"),
    }


# ---- parameters and qualitative predictions -----------------------------------------------


def parameters(cell: dict) -> dict:
    """Trainable and total parameters of the cell's network (the counts do not depend on its weights)."""
    from fedfms.bundle import bundle_network
    from fedfms.models import count_parameters

    count = count_parameters(bundle_network(cell["bundle"], cell["config_files"], **{**network_overrides(cell), "pretrained_checkpoint": "scratch"}))
    return {"trainable": count.trainable, "total": count.total}


def largest_label_slices(samples: list[dict], count: int) -> list[dict]:
    """The ``count`` samples whose centre label has the largest area; ties by case and slice (deterministic)."""

    def area(sample: dict) -> int:
        label = np.load(sample["label"])
        return int((label[label.shape[0] // 2] > 0).sum())

    ranked = sorted(samples, key=lambda s: (-area(s), str(s.get("case")), int(s.get("slice", 0))))
    return ranked[:count]


def save_qualitative(cell: dict, checkpoint: Path, datalists: dict[str, str], out: Path) -> dict[str, str]:
    """Predict the chosen test slices of each site (``{site: its datalist}``) with ``checkpoint``; ``{site: npz path}``."""
    from fedfms.bundle import load_datalist

    if not cell["qualitative_slices"]:
        return {}
    predict = Predictor(cell, checkpoint)
    saved = {}
    for site, datalist in datalists.items():
        samples = largest_label_slices(load_datalist(cell["data"], "testing", datalist, cell["partition"]), cell["qualitative_slices"])
        path = out / QUALITATIVE / f"{site}.npz"
        arrays = predict.slices(samples)
        atomic_write(path, lambda tmp, arrays=arrays: np.savez_compressed(tmp, site=np.array(site), **arrays))
        saved[site] = str(path.relative_to(out))
    return saved


class Predictor:
    """The cell's network with the weights of ``checkpoint``, on the evaluation's own sample transforms."""

    def __init__(self, cell: dict, checkpoint: Path) -> None:
        import torch

        from fedfms.bundle import bundle_parser, evaluation_overrides, profiles
        from fedfms.io import load_torch_file

        parser = bundle_parser(cell["bundle"], ["evaluate.json", *profiles(cell["config_files"])], **evaluation_overrides(scoring_overrides(cell)))
        saved = load_torch_file(checkpoint, "model not found", "a saved model", weights_only=False)
        state = saved["model"] if isinstance(saved, dict) and isinstance(saved.get("model"), dict) else saved
        self.device = parser.get_parsed_content("device")
        self.network = parser.get_parsed_content("network_def")
        self.network.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        self.network.to(self.device).eval()
        self.transform = parser.get_parsed_content("preprocessing")
        self.activation = parser.get_parsed_content("activation")
        self.slices_mode = parser.get_parsed_content("input_mode") == "slices"

    def slices(self, samples: list[dict]) -> dict[str, np.ndarray]:
        """Image (centre slice), label and thresholded prediction (at the stored label size) of each sample."""
        from fedfms.transforms.stored import load_prepared_image

        images, labels, predictions = [], [], []
        for sample in samples:
            image, label = load_prepared_image(sample["image"]), np.load(sample["label"])
            images.append(image[image.shape[0] // 2].astype(np.float32))
            labels.append((label[label.shape[0] // 2] > 0).astype(np.uint8))
            predictions.append(self.predict(sample, labels[-1].shape))
        return {
            "image": np.stack(images), "label": np.stack(labels), "prediction": np.stack(predictions),
            "case": np.array([str(s.get("case")) for s in samples]), "slice": np.array([int(s.get("slice", 0)) for s in samples]),
        }

    def predict(self, sample: dict, size: Sequence[int]) -> np.ndarray:
        """Foreground > 0.5 of the centre slice, as the evaluation computes it (sigmoid, or 1 - softmax background)."""
        import torch
        import torch.nn.functional as F

        item = self.transform({"image": sample["image"], "label": sample["label"]})
        with torch.no_grad():
            logits = self.network(torch.as_tensor(item["image"])[None].to(self.device)).float().cpu()
        logits = logits[logits.shape[0] // 2][None] if self.slices_mode else logits[:1]
        probability = torch.sigmoid(logits) if self.activation == "sigmoid" else 1 - torch.softmax(logits, dim=1)[:, :1]
        probability = F.interpolate(probability, size=tuple(size), mode="bilinear", align_corners=False)
        return (probability[0, 0] > 0.5).numpy().astype(np.uint8)


# ---- the cell -----------------------------------------------------------------------------

RUNNERS = {"local": run_local, "centralized": run_centralized, "federated": run_federated, "loso": run_federated}


def average(sites: dict[str, dict]) -> dict:
    """Unweighted mean over the sites of each metric, over the sites where it is defined (as the papers' "Average")."""
    means = {}
    for metric in TEST_METRICS:
        values = [v[metric] for v in sites.values() if isinstance(v.get(metric), (int, float)) and not math.isnan(v[metric])]
        means[metric] = fmean(values) if values else None
    return means


def json_safe(value):
    """``value`` with NaN and infinities as None: result.json stays standard JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_cell(cell: dict, out: Path) -> dict:
    """Run ``cell`` with its outputs in ``out``; the result's figures (raises on failure).

    The network is counted first: a bad network choice fails in seconds, not after the training.
    """
    counts = parameters(cell)
    outcome = RUNNERS[cell["setting"]](cell, out)
    return {**outcome, "average": average(outcome["sites"]), "parameters": counts}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cell in ``argv[0]`` (a cell.json) and write result.json beside it; exit 0 if it is ok, 1 if it failed."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m fedfms.experiment.cell CELL.json", file=sys.stderr)
        return 2
    path = Path(args[0]).resolve()
    cell, out = load_json(path), path.parent
    started, clock = now(), time.monotonic()
    print(f"cell {cell['id']}: {cell['setting']} {cell['method']} ({cell['bundle']}) started {started}", flush=True)
    try:
        outcome, status, reason = run_cell(cell, out), "ok", None
    except Exception as err:  # any failure is this cell's result; the runner goes on with the others
        traceback.print_exc()
        outcome, status, reason = {}, "failed", f"{type(err).__name__}: {err}"
    seconds = round(time.monotonic() - clock, 1)
    result = {"schema": SCHEMA, "cell": cell, "status": status, "reason": reason, "seconds": seconds, "started": started, "finished": now(), **outcome}
    save_json(out / RESULT, json_safe(result))
    print(f"cell {cell['id']}: {status} in {seconds} s" + (f": {reason}" if reason else ""), flush=True)
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
