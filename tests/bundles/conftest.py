"""A tiny prepared dataset in both layouts the bundles read, and a runner for the real bundle CLI."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
NAMES = ("fedsam_prostate", "fedmsa_prostate", "flapsam_prostate", "unet_prostate", "dynunet_prostate", "smlite_prostate")


@pytest.fixture(scope="session")
def standalone(tmp_path_factory) -> Path:
    """Each bundle folder copied alone (links kept as links, so a link out of the folder breaks), outside the repository."""
    root = tmp_path_factory.mktemp("standalone_bundles")
    for name in NAMES:
        shutil.copytree(BUNDLES / name, root / name, symlinks=True, ignore=shutil.ignore_patterns("models", "eval"))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Two sites, three cases each (one per split), prepared at 64 px as single slices and as 5-slice stacks."""
    root = tmp_path_factory.mktemp("bundle_data")
    synthesize_prostate(root / "raw", sites=["RUNMC", "BMC"], cases_per_site=3, seed=3, shape=(40, 40, 10))
    quiet = lambda _: None  # noqa: E731
    prepare(root / "raw", root / "data", PrepareOptions(image_size=64, label_size=64), log=quiet)
    prepare(root / "raw", root / "data_stack5", PrepareOptions(image_size=64, label_size=64, num_slices=5, all_label_slices=True), log=quiet)
    return root


def config_files(root: Path, bundle: str, *extra: str) -> str:
    """The bundle's complete config (``evaluate.json`` or ``inference.json`` if named, else ``train.json``), then the profiles."""
    base = next((name for name in extra if name in ("evaluate.json", "inference.json")), "train.json")
    files = [str(root / bundle / "configs" / name) for name in (base, *(name for name in extra if name != base))]
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def run_bundle(root: Path, bundle: str, *extra_configs: str, cwd: Path, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` exactly as a user types it, on the bundle under ``root``, from an unrelated working directory."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_files(root, bundle, *extra_configs), "--bundle_root", str(root / bundle)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def train_losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"train_loss: ([0-9.]+)", log)]
