"""``python -m monai.bundle run`` with a mistake in its inputs ends with one line: the file or folder at fault and the flag to change.

MONAI wraps every exception raised while it evaluates a config in "Failed to evaluate ConfigExpression"
(a 60-line traceback); the bundles' input checks (the first steps of ``initialize``) stop the run
with the message alone. Each test runs the real command, as a user types it, and reads the last
line of what it prints (stdout and stderr in the order they were written).
"""

import json
import shutil
import subprocess
import sys

import pytest

from tests.bundles.conftest import config_files

PRETRAINED_CHOICES = "pass --pretrained_checkpoint /path/to/sam_vit_b_01ec64.pth (a local file; nothing is downloaded), --pretrained_checkpoint litemedsam"


def run_lines(root, bundle, *extra_configs, cwd, bundle_root=None, **overrides) -> tuple[int, list[str]]:
    """Exit status and the non-empty lines of ``python -m monai.bundle run``, stderr merged into stdout."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_files(root, bundle, *extra_configs), "--bundle_root", str(bundle_root or root / bundle)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    result = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert not any(line.startswith("Traceback") for line in lines), result.stdout[-3000:]
    assert "train_loss" not in result.stdout  # stopped before any work
    return result.returncode, lines


def _outputs(tmp_path):
    return {"output_dir": tmp_path / "models", "log_dir": tmp_path / "logs"}


@pytest.mark.slow
def test_a_datalist_naming_a_missing_file(standalone, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "data", data)
    datalist = data / "datalists" / "RUNMC.json"
    missing = (datalist.parent / json.loads(datalist.read_text())["training"][3]["label"]).resolve()
    missing.unlink()
    status, lines = run_lines(standalone, "unet_prostate", "cpu_demo.json", cwd=tmp_path, dataset_dir=data, **_outputs(tmp_path))
    assert status == 1
    assert lines[-1] == (
        f"error: {missing}: listed in {datalist} (training label) but missing; prepare the data again (`fedfms prepare`), "
        "remove the entry from RUNMC.json, or pass --dataset_dir a complete copy"
    )


@pytest.mark.slow
def test_a_wrong_bundle_root(standalone, tiny_data, tmp_path):
    """The configs are found (--config_file) but --bundle_root names a folder without configs/."""
    status, lines = run_lines(standalone, "unet_prostate", "cpu_demo.json", cwd=tmp_path, bundle_root=tmp_path, dataset_dir=tiny_data / "data", **_outputs(tmp_path))
    assert status == 1
    assert lines[-1] == (
        f"error: {tmp_path}: --bundle_root is not a fedfms bundle folder (no configs/ folder); pass --bundle_root the bundle folder, "
        "the one that holds configs/method.json (the folder above the configs/ of --config_file)"
    )


@pytest.mark.slow
def test_a_wrong_dataset_dir(standalone, tmp_path):
    """A missing folder; raw volumes or a folder above the prepared data get their own advice (tests/test_bundle.py)."""
    status, lines = run_lines(standalone, "unet_prostate", "cpu_demo.json", cwd=tmp_path, dataset_dir=tmp_path / "nothing", **_outputs(tmp_path))
    assert status == 1
    assert lines[-1] == (
        f"error: {tmp_path / 'nothing'}: dataset_dir does not exist; pass --dataset_dir the --out folder of `fedfms prepare` "
        "(it holds datalists/ and prepare.json), or run `make demo`"
    )


@pytest.mark.slow
def test_a_missing_pretrained_checkpoint(standalone, tiny_data, tmp_path):
    missing = tmp_path / "sam_vit_b.pth"
    status, lines = run_lines(standalone, "fedsam_prostate", "cpu_demo.json", cwd=tmp_path, dataset_dir=tiny_data / "data", pretrained_checkpoint=missing, **_outputs(tmp_path))
    assert status == 1
    assert lines[-1].startswith(f"error: {missing}: pretrained checkpoint not found (pretrained_checkpoint); {PRETRAINED_CHOICES}")


@pytest.mark.slow
def test_the_paper_profile_requires_a_pretrained_checkpoint(standalone, tiny_data, tmp_path):
    """The SAM bundles as shipped (no profile) name no weights: the run says which flag to set."""
    status, lines = run_lines(standalone, "fedsam_prostate", cwd=tmp_path, dataset_dir=tiny_data / "data", **_outputs(tmp_path))
    assert status == 1
    assert lines[-1].startswith(f"error: pretrained_checkpoint is required: {PRETRAINED_CHOICES}")
