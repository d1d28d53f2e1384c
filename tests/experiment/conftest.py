"""Experiment files, synthetic cell results, and tiny prepared data for the end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedfms.data.partition import PartitionOptions, partition
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate
from fedfms.experiment.cell import TEST_METRICS
from fedfms.experiment.runner import EXPERIMENT_FILE


def write_config(folder: Path, text: str, name: str = "exp.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def metrics(dice_2d: float, dice_3d: float | None = None) -> dict:
    """A site's TEST_METRICS: 2D and 3D Dice given, the others derived so that each is distinct and finite."""
    dice_3d = dice_2d if dice_3d is None else dice_3d
    return {"dice_2d": dice_2d, "iou_2d": dice_2d / 2, "dice_3d": dice_3d, "dice_2d_fg": dice_2d, "fp_rate_empty": 0.1, "hd95_3d": 3.0}


def result(method: str, setting: str, sites: dict[str, dict], model: str = "sam", strategy: str = "full", pretrained: bool = True,
           status: str = "ok", **extra) -> dict:
    """A cell's result.json as the cell process writes it (only what the tables and figures read)."""
    cell = {"id": f"{method}-{setting}", "method": method, "setting": setting, "model": model, "strategy": strategy, "pretrained": pretrained}
    average = {m: sum(v[m] for v in sites.values()) / len(sites) for m in TEST_METRICS} if sites else {}
    return {"schema": 1, "cell": cell, "status": status, "reason": None if status == "ok" else "boom", "seconds": 12.0,
            "sites": sites, "average": average, **extra}


def write_experiment_dir(out: Path, results: list[dict], target_dice: float = 0.7) -> Path:
    """An experiment folder as the runner leaves it: experiment.json and cells/<id>/result.json."""
    for r in results:
        folder = out / "cells" / r["cell"]["id"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(r))
    record = {"name": "synthetic", "description": None, "config": "exp.yaml", "profile": "cpu_demo", "target_dice": target_dice,
              "cells": [r["cell"]["id"] for r in results]}
    (out / EXPERIMENT_FILE).write_text(json.dumps(record))
    return out


def qualitative_npz(path: Path, cases: list[str], seed: int = 0) -> None:
    """Saved slices as a cell process writes them: image 16 px, label and prediction 8 px."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.zeros((len(cases), 8, 8), np.uint8)
    label[:, 2:6, 2:6] = 1
    np.savez_compressed(path, site=np.array("A"), image=rng.random((len(cases), 16, 16)).astype(np.float32), label=label,
                        prediction=np.ones_like(label), case=np.array(cases), slice=np.arange(len(cases)))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Two synthetic hospitals of three small cases, prepared at 64 px as single slices and as 5-slice stacks, partitioned by site."""
    root = tmp_path_factory.mktemp("experiment_data")
    synthesize_prostate(root / "raw", sites=2, cases_per_site=3, seed=5, shape=(32, 32, 8))
    quiet = lambda _: None  # noqa: E731
    prepare(root / "raw", root / "data", PrepareOptions(image_size=64, label_size=64), log=quiet)
    prepare(root / "raw", root / "data_stack5", PrepareOptions(image_size=64, label_size=64, num_slices=5, all_label_slices=True), log=quiet)
    for data in ("data", "data_stack5"):
        partition(root / data, root / data / "partitions" / "natural", PartitionOptions(method="natural", proxy_fraction=0))
    return root
