"""What the bundles reference: datalists are checked before any work starts."""

import json
import shutil

import numpy as np
import pytest

from fedfms.bundle import bundle_dir, bundle_workflow, check_bundle_root, check_datalist, check_inputs, load_datalist
from fedfms.errors import BundleInputError, DataError
from tests.conftest import write_saml


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
    with pytest.raises(DataError, match=f"{datalists.parent / 'gone.npy'}: listed in {datalists / 'HK.json'} \\(training image\\) but missing; .* remove the entry from HK.json, or pass --dataset_dir a complete copy"):
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


# The bundles' input checks (the first steps of their configs' ``initialize``). ``python -m monai.bundle run``
# prints only the message of a BundleInputError (tests/bundles/test_input_errors.py runs the real command).


def _stop(call, *args, **kwargs) -> str:
    with pytest.raises(BundleInputError) as stop:
        call(*args, **kwargs)
    assert isinstance(stop.value, SystemExit) and not isinstance(stop.value, Exception)  # passes MONAI's `except Exception`
    return str(stop.value.code)


def test_a_wrong_bundle_root_is_named_with_the_flag(tmp_path):
    check_bundle_root(bundle_dir("bundles/unet_prostate"))
    assert _stop(check_bundle_root, tmp_path / "nope") == (
        f"error: {tmp_path / 'nope'}: --bundle_root does not exist; pass --bundle_root the bundle folder, the one that holds "
        "configs/method.json (the folder above the configs/ of --config_file)"
    )
    assert _stop(check_bundle_root, tmp_path).startswith(f"error: {tmp_path}: --bundle_root is not a fedfms bundle folder (no configs/ folder); pass --bundle_root ")
    (tmp_path / "configs").mkdir()
    assert "(no configs/method.json)" in _stop(check_bundle_root, tmp_path)


def test_a_wrong_dataset_dir_says_what_it_holds_instead(tmp_path, datalists):
    splits = ("training",)
    assert _stop(check_inputs, tmp_path / "gone", splits).startswith(f"error: {tmp_path / 'gone'}: dataset_dir does not exist; pass --dataset_dir the --out folder of `fedfms prepare`")
    raw = write_saml(tmp_path / "raw", sites=("A",), cases=1)
    assert _stop(check_inputs, raw, splits) == (
        f"error: {raw}: raw volumes in the 'saml' layout, not prepared data (dataset_dir); "
        f"prepare them with `fedfms prepare --src {raw} --layout saml --out DATA` and pass --dataset_dir DATA"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _stop(check_inputs, empty, splits).startswith(f"error: {empty / 'datalists'}: no prepared datalists here (dataset_dir); pass --dataset_dir ")
    outer = tmp_path / "outer"
    shutil.copytree(tmp_path, outer / "data", ignore=shutil.ignore_patterns("raw", "empty", "outer"))
    (outer / "data" / "prepare.json").write_text("{}")
    assert _stop(check_inputs, outer, splits) == f"error: {outer}: no datalists/ here, but data/ inside is prepared data; pass --dataset_dir {outer / 'data'}"
    assert "no such datalist folder in this prepared dataset; pass --datalist_dir datalists" in _stop(check_inputs, outer / "data", splits, datalist_dir="partitions/x")
    assert "no datalist for site(s) HKX; available: HK, RUNMC (change --sites)" in _stop(check_inputs, tmp_path, splits, "HKX")
    check_inputs(tmp_path, ("training", "validation"), "RUNMC")
    (tmp_path / "b.npy").unlink()
    assert _stop(check_inputs, tmp_path, splits, "RUNMC").startswith(f"error: {tmp_path / 'b.npy'}: listed in {datalists / 'RUNMC.json'} (training label) but missing")


def test_the_pretrained_checkpoint_is_checked_with_the_choices(tmp_path):
    check_inputs(pretrained_checkpoint="scratch")
    missing = tmp_path / "sam_vit_b.pth"
    assert _stop(check_inputs, pretrained_checkpoint=str(missing)).startswith(
        f"error: {missing}: pretrained checkpoint not found (pretrained_checkpoint); pass --pretrained_checkpoint /path/to/sam_vit_b_01ec64.pth "
    )
    for unset in ("REQUIRED", None):
        assert _stop(check_inputs, pretrained_checkpoint=unset).startswith("error: pretrained_checkpoint is required: pass --pretrained_checkpoint ")
    assert _stop(check_inputs, input_dir=tmp_path / "none").startswith(f"error: {tmp_path / 'none'}: no such file or folder to run inference on; pass --input_dir")


def test_code_that_builds_a_workflow_gets_the_data_error(tmp_path):
    """The federated client and the experiment runner catch exceptions: they get the DataError, not the CLI's exit."""
    with pytest.raises(DataError, match=f"{tmp_path / 'gone'}: dataset_dir does not exist"):
        bundle_workflow("bundles/unet_prostate", ["train.json", "cpu_demo.json"], "train", dataset_dir=str(tmp_path / "gone"), output_dir=str(tmp_path / "m"), log_dir=str(tmp_path / "l"))
