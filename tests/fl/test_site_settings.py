"""A site's own settings file: found in its startup kit or through the environment, checked, naming the file."""

import json

import pytest

from fedfms.errors import DataError
from fedfms.fl.site_settings import SETTINGS_ENV, SETTINGS_FILE, SiteSettings, read_site_settings


@pytest.fixture
def kit(tmp_path, monkeypatch):
    """A startup kit's ``local`` folder; the environment variable unset."""
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    local = tmp_path / "RUNMC" / "local"
    local.mkdir(parents=True)
    return local


def _write(path, values):
    path.write_text(json.dumps(values))
    return path


def test_no_file_keeps_the_jobs_values(kit):
    assert read_site_settings("RUNMC", kit) == SiteSettings()
    assert read_site_settings("RUNMC", None).describe() == "none: the job's values"


def test_the_kits_file_is_read_and_relative_paths_follow_the_file(kit, tmp_path):
    _write(kit / SETTINGS_FILE, {"dataset_dir": "../../data", "num_threads": 4, "device": "cpu", "output_dir": "/scratch/out"})
    settings = read_site_settings("RUNMC", kit)
    assert settings.dataset_dir == str(tmp_path / "data") and settings.output_dir == "/scratch/out"
    assert (settings.num_threads, settings.device, settings.datalist_dir) == (4, "cpu", None)
    assert settings.describe().endswith(f"(from {kit / SETTINGS_FILE})") and "num_threads=4" in settings.describe()


def test_the_environment_names_a_file_per_site_and_wins(kit, tmp_path, monkeypatch):
    _write(kit / SETTINGS_FILE, {"dataset_dir": "/kit/data"})
    _write(tmp_path / "BMC.json", {"dataset_dir": "/bmc/data"})
    _write(tmp_path / "RUNMC.json", {"dataset_dir": "/runmc/data"})
    monkeypatch.setenv(SETTINGS_ENV, str(tmp_path / "{site}.json"))
    assert read_site_settings("RUNMC", kit).dataset_dir == "/runmc/data"
    assert read_site_settings("BMC", None).dataset_dir == "/bmc/data"
    with pytest.raises(DataError, match=rf"HK.json: no such site settings file \(named by \${SETTINGS_ENV} for site HK\)"):
        read_site_settings("HK", None)


@pytest.mark.parametrize(
    "content, problem",
    [
        ({"data_dir": "/x"}, "unknown site setting 'data_dir'; known: dataset_dir, datalist_dir, num_threads, device, output_dir"),
        ({"num_threads": 0}, "num_threads must be a whole number >= 1, got 0"),
        ({"device": "gpu7"}, "device 'gpu7' is not a torch device"),
        ({"dataset_dir": ""}, "dataset_dir must be a non-empty string"),
        ({"dataset_cache_mb": -1}, "dataset_cache_mb must be a number of MiB >= 0, got -1"),
        ({"embedding_cache_mb": "2G"}, "embedding_cache_mb must be a number of MiB >= 0, got '2G'"),
        (["/data"], "site settings must be a JSON object"),
    ],
)
def test_a_bad_setting_names_the_file_and_the_key(kit, content, problem):
    path = _write(kit / SETTINGS_FILE, content)
    with pytest.raises(DataError, match=f"{path}: {problem}".replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_site_settings("RUNMC", kit)


def test_unreadable_json_names_the_file(kit):
    (kit / SETTINGS_FILE).write_text("{dataset_dir: ")
    with pytest.raises(DataError, match="cannot read the site settings"):
        read_site_settings("RUNMC", kit)


def test_cache_bounds_become_bundle_overrides_that_win_over_the_jobs(kit, tmp_path):
    from fedfms.fl.executors.learner import BundleLearner

    (tmp_path / "data").mkdir()
    _write(kit / SETTINGS_FILE, {"dataset_dir": str(tmp_path / "data"), "dataset_cache_mb": 0, "embedding_cache_mb": 256.5})
    learner = BundleLearner("bundles/flapsam_prostate", overrides={"dataset_cache_mb": 4096, "batch_size": 2})
    learner.site_name, learner.workspace = "RUNMC", None
    learner.settings = read_site_settings("RUNMC", kit)
    learner.resolved_data = tmp_path / "data"
    overrides = learner._bundle_overrides()
    assert (overrides["dataset_cache_mb"], overrides["embedding_cache_mb"], overrides["batch_size"]) == (0, 256.5, 2)
