"""A participant's own settings: where its data is, and optionally its threads, device and output folders.

A hospital points a job at its own data without editing the job. Its client reads
``local/fedfms_site.json`` in its startup kit (NVFlare's folder for site-local configuration,
beside ``resources.json``), or the file named by the environment variable ``FEDFMS_SITE_SETTINGS``
(which wins; ``{site}`` in it becomes the participant's name, so one variable serves every
simulated site). Every key is optional; a key that is set replaces the job's value::

    {
        "dataset_dir": "/data/prostate_prepared",
        "datalist_dir": "partitions/natural",
        "num_threads": 8,
        "device": "cuda:0",
        "output_dir": "/scratch/fedfms",
        "cache_dir": "/scratch/fedfms_cache",
        "dataset_cache_mb": 4096,
        "embedding_cache_mb": 2048
    }

Relative paths in the file are relative to the file's folder. Outputs (local checkpoints,
training logs, evaluation tables) go to ``<output_dir>/<job id>`` instead of the job's app folder.
The server reads the same file in its own kit for the FM-instructed-init pre-stage (its proxy
set: ``dataset_dir``, ``datalist_dir``; ``num_threads``, ``device``), and ``cache_dir`` is where it
keeps the teacher's logits (default ``<dataset_dir>/teacher_cache``), so the data folder may be
read-only. ``dataset_cache_mb`` and ``embedding_cache_mb`` bound the memory of the bundles' two
caches (loaded samples, per training or validation set; a frozen encoder's image embeddings), 0 turning
one off.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from fedfms.errors import DataError

SETTINGS_FILE = "fedfms_site.json"
SETTINGS_ENV = "FEDFMS_SITE_SETTINGS"
HINT = f"local/{SETTINGS_FILE} in the site's startup kit, or the file named by ${SETTINGS_ENV}"


@dataclass(frozen=True)
class SiteSettings:
    """What a site set for itself (None: keep the job's value), and the file it came from."""

    dataset_dir: str | None = None
    datalist_dir: str | None = None
    num_threads: int | None = None
    device: str | None = None
    output_dir: str | None = None
    cache_dir: str | None = None
    dataset_cache_mb: float | None = None
    embedding_cache_mb: float | None = None
    source: Path | None = None

    def describe(self) -> str:
        """``dataset_dir=..., num_threads=... (from FILE)`` for the site's log."""
        values = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "source" and getattr(self, f.name) is not None)
        return f"{values or 'nothing set'} (from {self.source})" if self.source else "none: the job's values"


KEYS = tuple(f.name for f in fields(SiteSettings) if f.name != "source")
PATH_KEYS = ("dataset_dir", "output_dir", "cache_dir")
MEMORY_KEYS = ("dataset_cache_mb", "embedding_cache_mb")  # bundle overrides of the same name


def settings_file(site: str, local_dir: str | os.PathLike | None) -> Path | None:
    """The file to read: ``$FEDFMS_SITE_SETTINGS`` (with ``{site}`` filled in) if set, else the kit's, if present."""
    named = os.environ.get(SETTINGS_ENV)
    if named:
        path = Path(named.replace("{site}", site))
        if not path.is_file():
            raise DataError(path, f"no such site settings file (named by ${SETTINGS_ENV} for site {site})")
        return path
    kit_file = Path(local_dir) / SETTINGS_FILE if local_dir else None
    return kit_file if kit_file and kit_file.is_file() else None


def read_site_settings(site: str, local_dir: str | os.PathLike | None = None) -> SiteSettings:
    """This site's settings (see the module docstring); empty when it has no file. Bad values name the file and key."""
    path = settings_file(site, local_dir)
    if path is None:
        return SiteSettings()
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(path, f"cannot read the site settings: {error}") from error
    if not isinstance(values, dict):
        raise DataError(path, "site settings must be a JSON object of " + ", ".join(KEYS))
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise DataError(path, f"unknown site setting {unknown[0]!r}; known: {', '.join(KEYS)}")
    return SiteSettings(**{k: _checked(path, k, v) for k, v in values.items()}, source=path)


def _checked(path: Path, key: str, value):
    if key == "num_threads":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(path, f"num_threads must be a whole number >= 1, got {value!r}")
        return value
    if key in MEMORY_KEYS:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
            raise DataError(path, f"{key} must be a number of MiB >= 0, got {value!r}")
        return value
    if not isinstance(value, str) or not value:
        raise DataError(path, f"{key} must be a non-empty string, got {value!r}")
    if key == "device":
        try:
            torch.device(value)
        except RuntimeError as error:
            raise DataError(path, f"device {value!r} is not a torch device: {error}") from error
    if key in PATH_KEYS:
        return str((path.parent / value).resolve())
    return value
