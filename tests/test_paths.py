"""Relative paths and shipped job names resolve the same from any working directory."""

import pytest

from fedfms.errors import DataError
from fedfms.paths import JOB_CONFIG, find_job, resolve_path, shipped_jobs

REPO_JOBS = resolve_path("jobs")


def test_a_shipped_job_is_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_job("fedmsa_prostate") == REPO_JOBS / "fedmsa_prostate"
    assert find_job("jobs/fedmsa_prostate") == REPO_JOBS / "fedmsa_prostate"
    assert "fminit_prostate" in shipped_jobs() and all((REPO_JOBS / name / JOB_CONFIG).is_file() for name in shipped_jobs())


def test_a_folder_of_the_same_name_wins_over_the_shipped_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fedmsa_prostate").mkdir()
    assert find_job("fedmsa_prostate") == tmp_path / "fedmsa_prostate"
    assert find_job(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # an explicit path is taken as given


def test_an_unknown_job_name_lists_the_shipped_jobs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no_such_job: no such job folder, .*shipped jobs: fedmsa_prostate, "):
        find_job("no_such_job")
