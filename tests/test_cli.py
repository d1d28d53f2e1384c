"""The installed ``fedfms`` console script, run as a user would, from synthesis to client datalists."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FEDFMS = Path(sys.executable).with_name("fedfms")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(FEDFMS), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not FEDFMS.exists(), reason="the package is not installed with its console script")
def test_synth_prepare_partition_pipeline(tmp_path):
    raw, data = tmp_path / "raw", tmp_path / "data"
    synth = _run("synth", "prostate", "--out", str(raw), "--sites", "3", "--cases-per-site", "3", "--shape", "24", "24", "10")
    assert synth.returncode == 0, synth.stderr
    assert sorted(p.name for p in raw.iterdir()) == ["BMC", "I2CVB", "RUNMC"]
    prepared = _run("prepare", "--src", str(raw), "--out", str(data), "--image-size", "16", "--label-size", "16", "--num-slices", "5")
    assert prepared.returncode == 0, prepared.stderr
    assert "prepared 9 cases (9 processed, 0 up to date)" in prepared.stdout
    again = _run("prepare", "--src", str(raw), "--out", str(data), "--image-size", "16", "--label-size", "16", "--num-slices", "5")
    assert "(0 processed, 9 up to date)" in again.stdout
    part = _run("partition", "--data", str(data), "--method", "loso", "--unseen", "I2CVB")
    assert part.returncode == 0, part.stderr
    assert "unseen" in part.stdout and "0/0/3" in part.stdout
    summary = json.loads((data / "partitions" / "loso" / "partition.json").read_text())
    assert summary["clients"] == ["BMC", "RUNMC"]


def test_synth_bad_arguments(tmp_path):
    result = _run("synth", "prostate", "--out", str(tmp_path), "--sites", "9")
    assert result.returncode == 2 and "9" in result.stderr
    result = _run("synth", "prostate", "--out", str(tmp_path), "--sites", "RUNMC", "Mars")
    assert result.returncode == 2 and "Mars" in result.stderr


def test_job_compress_choices_are_the_filters_modes():
    """The CLI lists the modes without importing torch at start-up; they must stay those the filters know."""
    from fedfms.cli import build_parser
    from fedfms.fl.filters.compression import MODES

    job = build_parser()._subparsers._group_actions[0].choices["job"]
    assert next(a for a in job._actions if a.dest == "compress").choices == MODES
