"""What the bundles reference: datalists are checked before any work starts."""

import json

import numpy as np
import pytest

from fedfms.bundle import bundle_dir, check_datalist, load_datalist
from fedfms.errors import DataError


@pytest.fixture
def datalists(tmp_path):
    folder = tmp_path / "datalists"
    folder.mkdir()
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.zeros((1, 4, 4), np.float32))
    entry = {"image": "../a.npy", "label": "../b.npy"}
    (folder / "RUNMC.json").write_text(json.dumps({"training": [entry], "validation": [entry], "testing": []}))
    (folder / "HK.json").write_text(json.dumps({"training": [{"image": "../gone.npy", "label": "../b.npy"}]}))
    return folder


def test_missing_files_are_named_with_their_datalist(datalists):
    assert len(load_datalist(datalists.parent, "training", "RUNMC")) == 1
    with pytest.raises(DataError, match=f"{datalists.parent / 'gone.npy'}: listed in {datalists / 'HK.json'} \\(training\\) but missing"):
        load_datalist(datalists.parent, "training", "HK")


def test_a_site_without_samples_in_a_split_is_named(datalists):
    check_datalist(datalists / "RUNMC.json", ("training", "validation"))
    with pytest.raises(DataError, match="RUNMC.json: has no 'testing' samples \\(were its cases skipped by `fedfms prepare --on-error skip`\\?\\)"):
        check_datalist(datalists / "RUNMC.json", ("testing",))
    with pytest.raises(DataError, match="HK.json: has no 'validation' samples"):
        check_datalist(datalists / "HK.json", ("validation",))


def test_a_missing_bundle_says_where_it_was_looked_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"no MONAI bundle here \(no configs/ folder\); bundles/nope was looked up in {tmp_path}, "):
        bundle_dir("bundles/nope")
    assert bundle_dir("bundles/unet_prostate").name == "unet_prostate"  # found in the source tree (or the installed package)
