"""The package as users install it: a wheel that carries the bundles and runs a job without the repository."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "custom", "bundles", "jobs", "deploy")
DATA_PACKAGES = {"fedfms.bundles", "fedfms.jobs", "fedfms.deploy"}  # folders of the repository carried as package data


def _configured_packages() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_subpackage_the_bundles_jobs_and_deploy_files_are_packaged():
    found = {".".join(p.parent.relative_to(REPO / "custom").parts) for p in (REPO / "custom/fedfms").rglob("__init__.py")}
    assert _configured_packages() == found | DATA_PACKAGES


def _run(command: list[str], cwd: Path, timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, (command, (result.stdout + result.stderr)[-3000:])
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh environment holding the built wheel; its dependencies come from this one (a .pth line), the repository not at all."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:  # build from a copy so the build leaves nothing in the repository
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(root / "dist")], root)
    env = root / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], root)
    site_packages = Path(_run([str(env / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).strip())
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((root / "dist").glob("fedfms-*.whl"))
    _run([str(env / "bin/python"), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)], root)
    return env


@pytest.mark.slow
def test_installed_wheel_runs_a_job_from_a_folder_outside_the_repository(installed, tmp_path):
    python, fedfms = str(installed / "bin/python"), str(installed / "bin/fedfms")
    where = _run([python, "-c", "import fedfms, fedfms.paths as p; print(fedfms.__file__); print(p.source_root())"], tmp_path).split()
    assert where[0].startswith(str(installed)) and where[1] == "None"  # the installed copy, no source tree behind it
    path = _run([python, "-c", "import sys; print('\\n'.join(sys.path))"], tmp_path).split()
    assert str(REPO) not in path and not [p for p in path if p.startswith(str(REPO / "custom"))]  # the repository is not importable
    _run([fedfms, "synth", "prostate", "--out", "raw", "--sites", "BMC", "RUNMC", "--cases-per-site", "3", "--shape", "32", "32", "8"], tmp_path)
    _run([fedfms, "prepare", "--src", "raw", "--out", "data", "--bundle", "bundles/unet_prostate", "--image-size", "64", "--label-size", "64"], tmp_path)
    _run([fedfms, "partition", "--data", "data", "--method", "natural", "--proxy-fraction", "0"], tmp_path)
    _run([fedfms, "job", "fedunet_prostate", "--out", "job", "--dataset-dir", "data", "--num-rounds", "1"], tmp_path)  # the packaged job, by name
    assert json.loads((tmp_path / "job/meta.json").read_text())["name"] == "job"
    log = _run([python, "-m", "nvflare.cli", "simulator", "job", "-w", "ws", "-c", "BMC,RUNMC", "-t", "2"], tmp_path, timeout=400)
    bundle = installed / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages/fedfms/bundles/unet_prostate"
    assert f"site BMC trains bundle {bundle} on datalist BMC" in log and "Finished FedAvg." in log and "Traceback" not in log
    app = tmp_path / "ws/server/simulate_job/app_server"
    rows = json.loads((app / "round_metrics.json").read_text())
    assert sorted((r["site"], r["status"]) for r in rows) == [("BMC", "accepted"), ("RUNMC", "accepted")]
    model = torch.load(app / "FL_global_model.pt", weights_only=False)
    assert model["meta_props"]["completed_rounds"] == 1 and all(torch.isfinite(torch.as_tensor(v)).all() for v in model["model"].values())
    assert {r["site"] for r in json.loads((app / "final_test.json").read_text())} == {"BMC", "RUNMC", "average"}


@pytest.mark.slow
def test_installed_wheel_ships_every_job_and_the_deployment_files(installed, tmp_path):
    """Without the repository: every job folder byte for byte, `fedfms deploy-template`, and an unknown job's error lists the shipped ones."""
    python, fedfms = str(installed / "bin/python"), str(installed / "bin/fedfms")
    package = Path(_run([python, "-c", "import fedfms.paths as p; print(p.package_root())"], tmp_path).strip())
    shipped = sorted(p.relative_to(package / "jobs") for p in (package / "jobs").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert shipped == sorted(p.relative_to(REPO / "jobs") for p in (REPO / "jobs").rglob("*") if p.is_file())
    assert all((package / "jobs" / p).read_bytes() == (REPO / "jobs" / p).read_bytes() for p in shipped)
    _run([fedfms, "deploy-template", "--out", "kit"], tmp_path)
    for name in ("project.yml", "submit_job.py"):
        assert (tmp_path / "kit" / name).read_bytes() == (REPO / "deploy" / name).read_bytes()
    result = subprocess.run([fedfms, "job", "no_such_job", "--out", "x"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "shipped jobs: fedmsa_prostate, fedmsa_prostate_loso, fednnunet_prostate" in result.stderr
