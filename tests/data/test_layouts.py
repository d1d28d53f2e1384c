import json

import pytest

from fedfms.data.layouts import detect_layout, find_cases
from fedfms.errors import DataError
from tests.conftest import gland_case, write_nifti, write_saml


def test_saml_pairs_both_capitalisations_and_ignores_temporary_files(tmp_path):
    write_saml(tmp_path, sites=("BMC", "RUNMC"), cases=2)
    (tmp_path / "RUNMC" / ".Case09.nii.gz.tmp-1.nii.gz").write_bytes(b"")
    (tmp_path / "RUNMC" / "notes.txt").write_text("not a volume")
    records = find_cases(tmp_path, "saml")
    assert [(r.site, r.case) for r in records] == [("BMC", "Case00"), ("BMC", "Case01"), ("RUNMC", "Case00"), ("RUNMC", "Case01")]
    assert records[0].label.name == "Case00_segmentation.nii.gz"
    assert records[1].label.name == "Case01_Segmentation.nii.gz"
    assert all(r.channel is None for r in records)


def test_saml_missing_label_is_reported_as_none(tmp_path):
    write_saml(tmp_path, sites=("HK",), cases=1)
    (tmp_path / "HK" / "Case00_segmentation.nii.gz").unlink()
    assert find_cases(tmp_path, "saml")[0].label is None


def test_fedfms_layout_matches_equal_names(tmp_path):
    image, label = gland_case()
    for name in ("a.nii.gz", "b.nii.gz"):
        write_nifti(tmp_path / "site1" / "images" / name, image)
    write_nifti(tmp_path / "site1" / "labels" / "a.nii.gz", label)
    records = find_cases(tmp_path, "fedfms")
    assert [(r.case, r.label.name if r.label else None) for r in records] == [("a", "a.nii.gz"), ("b", None)]


def test_msd_reads_dataset_json(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTr" / "prostate_04.nii.gz").write_bytes(b"x")
    (tmp_path / "labelsTr" / "prostate_04.nii.gz").write_bytes(b"x")
    index = {"training": [{"image": "./imagesTr/prostate_04.nii.gz", "label": "./labelsTr/prostate_04.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(index))
    [record] = find_cases(tmp_path, "msd", msd_site="Decathlon", msd_channel=1)
    assert (record.site, record.case, record.channel) == ("Decathlon", "prostate_04", 1)
    assert record.label == (tmp_path / "labelsTr" / "prostate_04.nii.gz").resolve()


def test_msd_without_training_list(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(DataError, match="dataset.json: has no 'training' list"):
        find_cases(tmp_path, "msd")


def test_empty_or_missing_folders_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="source folder not found"):
        find_cases(tmp_path / "missing", "saml")
    with pytest.raises(DataError, match="no volumes found in the 'saml' layout"):
        find_cases(tmp_path, "saml")
    with pytest.raises(ValueError, match="unknown layout 'xyz'"):
        find_cases(tmp_path, "xyz")


def test_a_folder_of_another_layout_names_the_layout_it_looks_like(tmp_path):
    saml = write_saml(tmp_path / "saml", sites=("BMC",), cases=1)
    with pytest.raises(DataError) as err:
        find_cases(saml, "msd")
    assert str(err.value) == (
        f"{saml}: no dataset.json here, so this is not a Medical Segmentation Decathlon task folder (--layout msd); "
        "it looks like the 'saml' layout (SRC/<SITE>/CaseNN.nii.gz with CaseNN_segmentation.nii.gz): pass --layout saml"
    )
    with pytest.raises(DataError, match=r"no volumes found in the 'fedfms' layout \(SRC/<site>/images/<name> .*\); it looks like the 'saml' layout .*: pass --layout saml$"):
        find_cases(saml, "fedfms")
    image, label = gland_case()
    write_nifti(tmp_path / "fed" / "site1" / "images" / "a.nii.gz", image)
    write_nifti(tmp_path / "fed" / "site1" / "labels" / "a.nii.gz", label)
    with pytest.raises(DataError, match="no volumes found in the 'saml' layout .*; it looks like the 'fedfms' layout .*: pass --layout fedfms$"):
        find_cases(tmp_path / "fed", "saml")
    (tmp_path / "msd" / "imagesTr").mkdir(parents=True)
    assert [detect_layout(tmp_path / name) for name in ("saml", "fed", "msd", "missing")] == ["saml", "fedfms", "msd", None]
    with pytest.raises(DataError, match=r"not a Medical Segmentation Decathlon task folder \(--layout msd\); an MSD task folder needs its dataset.json"):
        find_cases(tmp_path / "msd", "msd")
    with pytest.raises(DataError, match="its volumes lie directly in it, as in one site's folder: pass the folder above it as --src"):
        find_cases(saml / "BMC", "saml")
    (tmp_path / "prepared" / "datalists").mkdir(parents=True)
    (tmp_path / "prepared" / "prepare.json").write_text("{}")
    with pytest.raises(DataError, match=r"it is a prepared dataset \(the output of `fedfms prepare`\): pass the raw data folder as --src"):
        find_cases(tmp_path / "prepared", "saml")


def test_prepare_with_the_wrong_layout_ends_with_the_layout_to_pass(tmp_path, capsys):
    """``fedfms prepare --layout msd`` on a SAML folder: the last line names the folder and ``--layout saml``."""
    from fedfms.cli import main

    src = write_saml(tmp_path / "raw", sites=("RUNMC",), cases=1)
    assert main(["prepare", "--src", str(src), "--layout", "msd", "--out", str(tmp_path / "out")]) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {src}: no dataset.json here, so this is not a Medical Segmentation Decathlon task folder (--layout msd)")
    assert last.endswith(": pass --layout saml")
    assert not (tmp_path / "out").exists()
