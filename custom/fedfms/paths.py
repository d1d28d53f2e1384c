"""Where relative paths in job and bundle settings point.

NVFlare runs server and clients inside its workspace, not where ``nvflare simulator`` was typed,
so a relative path such as ``bundles/fedmsa_prostate`` or ``demo/data`` is looked up in the
working directory first, then in the fedfms source tree of an editable install
(``pip install -e .``), then in the installed package, which carries the bundles as package data
(``fedfms/bundles``): a site with a regular ``pip install`` of fedfms and the job folder finds
every bundle a job names. Data paths on real sites are absolute (site settings or ``fedfms job``).

The shipped job folders (``fedfms/jobs``) and deployment files (``fedfms/deploy``) travel the
same way: :func:`find_job` takes a job folder or a shipped job's name (``fedmsa_prostate``).
"""

from __future__ import annotations

import os
from pathlib import Path

import fedfms
from fedfms.errors import DataError

JOBS = "jobs"  # the shipped job folders, in the repository and in the installed package
DEPLOY = "deploy"  # the shipped project.yml and submit_job.py
JOB_CONFIG = Path("app", "config", "config_fed_client.json")  # every NVFlare job folder has one


def package_root() -> Path:
    """The installed ``fedfms`` package folder; a regular install holds ``bundles/`` here."""
    return Path(fedfms.__file__).resolve().parent


def source_root() -> Path | None:
    """The repository an editable install points at (it holds ``bundles/``), else None."""
    root = package_root().parents[1]
    return root if (root / "bundles").is_dir() else None


def search_roots() -> list[Path]:
    """Where a relative path is looked up, in order."""
    source = source_root()
    return [Path.cwd()] + ([source] if source else []) + [package_root()]


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` itself if absolute; else the first existing of ``root/path`` for the :func:`search_roots`.

    When none exists, ``cwd/path`` is returned so the caller's error names where it looked.
    """
    path = Path(path)
    if path.is_absolute():
        return path
    candidates = [root / path for root in search_roots()]
    return next((c for c in candidates if c.exists()), candidates[0])


def shipped_jobs() -> list[str]:
    """Names of the job folders that come with fedfms (``fedfms job NAME`` finds them)."""
    folder = resolve_path(JOBS)
    return sorted(p.name for p in folder.iterdir() if (p / JOB_CONFIG).is_file()) if folder.is_dir() else []


def find_job(job: str | os.PathLike) -> Path:
    """A job folder: ``job`` itself (a path, see :func:`resolve_path`), or the shipped job of that name.

    Raises:
        DataError: neither exists; the message lists the shipped jobs.
    """
    path = resolve_path(job)
    if path.exists() or Path(job).is_absolute() or len(Path(job).parts) > 1:
        return path
    shipped = resolve_path(Path(JOBS, job))
    if shipped.is_dir():
        return shipped
    raise DataError(path, f"no such job folder, and no job of that name ships with fedfms; shipped jobs: {', '.join(shipped_jobs())}")


def deploy_file(name: str) -> Path:
    """A shipped deployment file (``project.yml``, ``submit_job.py``)."""
    return resolve_path(Path(DEPLOY, name))
