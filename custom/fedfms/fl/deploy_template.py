"""``fedfms deploy-template``: the shipped NVFlare project file and FLARE API submit script, written out.

``project.yml`` describes one server and three hospitals (RUNMC, BMC, HK), each its own org with a
lead, and the project admin; as shipped it rehearses a deployment on one machine (server
``localhost``). ``server`` and ``sites`` rename the server and replace the hospitals (each gets
an org and a lead of its own); names are checked with NVFlare's own rules before anything is
written. ``submit_job.py`` submits a job folder, waits, downloads the result and always closes
its session.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml
from nvflare.apis.utils.format_check import name_check

from fedfms.errors import DataError
from fedfms.io import atomic_write
from fedfms.paths import deploy_file

PROJECT = "project.yml"
SUBMIT = "submit_job.py"


def write_deploy_template(out_dir: str | os.PathLike, server: str | None = None, sites: Sequence[str] | None = None) -> list[Path]:
    """Write ``project.yml`` and ``submit_job.py`` into ``out_dir``; refuses to replace either."""
    out = Path(out_dir)
    targets = [out / PROJECT, out / SUBMIT]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise DataError(existing[0], "already exists; choose another --out folder (nothing was written)")
    project = project_text(server, sites)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(targets[0], lambda tmp: Path(tmp).write_text(project))
    atomic_write(targets[1], lambda tmp: shutil.copyfile(deploy_file(SUBMIT), tmp))
    return targets


def project_text(server: str | None = None, sites: Sequence[str] | None = None) -> str:
    """The shipped project file, verbatim, or with the server renamed and the hospitals replaced."""
    text = deploy_file(PROJECT).read_text()
    if server is None and not sites:
        return text
    project = yaml.safe_load(text)
    participants = project["participants"]
    if server is not None:
        _check_name(server, "server", "--server")
        next(p for p in participants if p["type"] == "server")["name"] = server
    if sites:
        participants[:] = [p for p in participants if p["type"] == "server" or p.get("role") == "project_admin"]
        participants += _hospitals(sites)
    return _leading_comments(text) + yaml.safe_dump(project, sort_keys=False)


def _leading_comments(text: str) -> str:
    """The file's opening comment block (its guidance), which a YAML dump would drop."""
    lines = text.splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return "".join(lines[:end])


def _hospitals(sites: Sequence[str]) -> list[dict]:
    """A client per site, each in its own org with a lead who may submit the jobs."""
    if len(set(sites)) != len(sites):
        raise ValueError(f"--sites names a site twice: {', '.join(sites)}")
    hospitals = []
    for site in sites:
        _check_name(site, "client", "--sites")
        org = site.lower().replace("-", "_")
        hospitals.append({"name": site, "type": "client", "org": org})
        hospitals.append({"name": f"lead@{org.replace('_', '-')}.example.org", "type": "admin", "org": org, "role": "lead"})
    return hospitals


def _check_name(name: str, kind: str, option: str) -> None:
    bad, message = name_check(name, kind)
    if bad:
        raise ValueError(f"{option}: {name!r} is not a valid NVFlare {kind} name ({message})")
