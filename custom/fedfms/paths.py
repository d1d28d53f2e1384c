"""Where relative paths in job and bundle settings point.

NVFlare runs server and clients inside its workspace, not where ``nvflare simulator`` was typed,
so a relative path such as ``bundles/fedmsa_prostate`` or ``demo/data`` is looked up in the
working directory first, then in the fedfms source tree of an editable install
(``pip install -e .``), then in the installed package, which carries the bundles as package data
(``fedfms/bundles``): a site with a regular ``pip install`` of fedfms and the job folder finds
every bundle a job names. Data paths on real sites are absolute (site settings or ``fedfms job``).
"""

from __future__ import annotations

import os
from pathlib import Path

import fedfms


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
