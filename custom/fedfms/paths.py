"""Where relative paths in job and bundle settings point.

NVFlare runs server and clients inside its workspace, not where ``nvflare simulator`` was typed,
so a relative path such as ``bundles/fedmsa_prostate`` or ``demo/data`` is looked up in the
working directory first and then in the fedfms source tree the package was installed from
(``pip install -e .``). Production sites give absolute paths and never rely on the fallback.
"""

from __future__ import annotations

import os
from pathlib import Path

import fedfms


def source_root() -> Path | None:
    """The repository an editable install points at (it holds ``bundles/``), else None."""
    root = Path(fedfms.__file__).resolve().parents[2]
    return root if (root / "bundles").is_dir() else None


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` itself if absolute; else the first existing of ``cwd/path`` and ``source_root/path``.

    When neither exists, ``cwd/path`` is returned so the caller's error names where it looked.
    """
    path = Path(path)
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path] + ([source_root() / path] if source_root() else [])
    return next((c for c in candidates if c.exists()), candidates[0])
