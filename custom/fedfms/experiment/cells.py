"""Methods x settings -> cells: one unit of work each, with a stable id and everything its process needs.

A cell's id is ``<method>-<setting>`` (``fedmsa-federated``, ``fedmsa_pt-local``,
``flapsam_dec-centralized``, ``fedmsa-loso``): the name of its folder under ``<out>/cells``, the
same on every run of the same file, so a re-run finds what is done. A cell is a plain JSON-able
dict (written to ``cells/<id>/cell.json`` for its process); a finished cell is skipped only when
its recorded definition equals the current one, so a changed file re-runs what it changed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

from fedfms.experiment.config import ExperimentConfig, MethodConfig

CELLS_DIR = "cells"


def cell_id(method: str, setting: str) -> str:
    return f"{method}-{setting}"


def expand_cells(config: ExperimentConfig) -> list[dict]:
    """Every cell of the experiment, in file order: each method's settings in the order it lists them."""
    return [make_cell(config, method, setting) for method in config.methods for setting in method.settings]


def make_cell(config: ExperimentConfig, method: MethodConfig, setting: str) -> dict:
    """The definition of one cell (no output paths: the runner adds ``dir``)."""
    federated = setting in ("federated", "loso")
    return {
        "id": cell_id(method.name, setting),
        "method": method.name,
        "setting": setting,
        "bundle": method.bundle,
        "job": method.job if federated else None,
        "model": method.model,
        "strategy": method.strategy,
        "pretrained": method.pretrained,
        "profile": config.profile,
        "config_files": list(config.config_files),
        "data": method.data,
        "partition": method.loso_partition if setting == "loso" else method.partition,
        "sites": list(method.sites) if method.sites else None,
        "size": method.size,
        "image_size": method.image_size,
        "pretrained_checkpoint": method.pretrained_checkpoint,
        "device": config.device,
        "seed": config.seed,
        "rounds": config.rounds if federated else None,
        "epochs": config.epochs if federated else None,
        "train_epochs": None if federated else config.train_epochs,
        "init_mode": method.init_mode if federated else None,
        "prestage_epochs": method.prestage_epochs if federated else None,
        "compress": method.compress if federated else None,
        "algorithm": method.algorithm if federated else None,
        "algorithm_options": dict(method.algorithm_options) if federated else {},
        "threads": config.threads if federated else None,
        "task_timeout": config.task_timeout if federated else None,
        "qualitative_slices": config.qualitative_slices,
        "overrides": dict(method.overrides),
    }


def select_cells(cells: list[dict], patterns: Sequence[str] | None) -> list[dict]:
    """The cells whose id matches one of the shell-style ``patterns`` (all without patterns); a pattern matching nothing is an error."""
    if not patterns:
        return cells
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(c["id"], pattern) for c in cells):
            raise ValueError(f"--only {pattern!r} matches no cell; cells: {', '.join(c['id'] for c in cells)}")
    return [c for c in cells if any(fnmatch.fnmatchcase(c["id"], p) for p in patterns)]


def cell_dir(out: str | Path, cell: dict | str) -> Path:
    """The folder of a cell: ``<out>/cells/<id>``."""
    return Path(out) / CELLS_DIR / (cell if isinstance(cell, str) else cell["id"])
