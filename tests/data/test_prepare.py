"""``fedfms prepare`` end to end on small files written in each raw layout."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import load_decathlon_datalist

import fedfms
from fedfms.cli import main
from fedfms.data import prepare as prepare_module
from fedfms.data.partition import load_prepared_cases
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.errors import DataError
from tests.conftest import gland_case, write_nifti, write_saml

SMALL = dict(image_size=16, label_size=8, num_slices=3)
ULP_TOLERANCE = 1e-6  # images in [0, 1]: a few float32 ulps (6e-8 each)


def _quiet(_):
    pass


def _outputs(root: Path) -> dict[str, bytes]:
    """Every prepared file's bytes, keyed by relative path (prepare.json holds an absolute source path)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "prepare.json"}


def test_saml_layout_writes_samples_and_datalists(tmp_path):
    raw = write_saml(tmp_path / "raw", sites=("A", "B"), cases=4)
    result = prepare(raw, tmp_path / "data", PrepareOptions(**SMALL), log=_quiet)
    assert result.processed == 8 and not result.skipped
    for site in ("A", "B"):
        datalist = json.loads((tmp_path / "data" / "datalists" / f"{site}.json").read_text())
        cases = {s: {e["case"] for e in datalist[s]} for s in ("training", "validation", "testing")}
        assert [len(c) for c in cases.values()] == [2, 1, 1]  # split by case: no case in two splits
        assert sum(len(datalist[s]) for s in cases) == 4 * 8  # every slice kept, empty ones too
        entry = datalist["training"][0]
        assert set(entry) == {"image", "label", "site", "case", "slice"} and entry["site"] == site
    loaded = load_decathlon_datalist(tmp_path / "data" / "datalists" / "A.json", data_list_key="training")
    image, label = np.load(loaded[0]["image"]), np.load(loaded[0]["label"])
    assert image.shape == (3, 16, 16) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    assert label.shape == (1, 8, 8) and label.dtype == np.uint8
    summary = json.loads((tmp_path / "data" / "prepare.json").read_text())
    assert summary["fedfms_version"] == fedfms.__version__
    assert summary["options"]["num_slices"] == 3 and summary["options"]["upper_percentile"] == 99.0
    assert len(summary["cases"]) == 8 and summary["skipped"] == []


def test_fedfms_layout(tmp_path):
    for c in range(3):
        image, label = gland_case(seed=c)
        write_nifti(tmp_path / "raw" / "siteX" / "images" / f"p{c}.nii.gz", image)
        write_nifti(tmp_path / "raw" / "siteX" / "labels" / f"p{c}.nii.gz", label)
    result = prepare(tmp_path / "raw", tmp_path / "data", PrepareOptions(layout="fedfms", **SMALL), log=_quiet)
    assert sorted(c["case"] for c in result.cases) == ["p0", "p1", "p2"]
    assert (tmp_path / "data" / "datalists" / "siteX.json").is_file()


def _write_msd(root: Path, channels: np.ndarray, label: np.ndarray) -> None:
    write_nifti(root / "imagesTr" / "prostate_00.nii.gz", channels)
    write_nifti(root / "labelsTr" / "prostate_00.nii.gz", label)
    index = {"name": "Prostate", "modality": {"0": "T2", "1": "ADC"},
             "training": [{"image": "./imagesTr/prostate_00.nii.gz", "label": "./labelsTr/prostate_00.nii.gz"}],
             "test": ["./imagesTs/prostate_01.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(index))


@pytest.mark.parametrize("channel", [0, 1])
def test_msd_layout_uses_the_chosen_channel_and_merges_labels(tmp_path, channel):
    t2, label = gland_case(seed=1)
    adc = t2.max() - t2  # an inverted contrast: the output tells which channel was used
    label[label > 0] = 2  # MSD prostate: 1 peripheral zone, 2 transition zone
    _write_msd(tmp_path / "raw", np.stack([t2, adc], axis=-1), label)
    options = PrepareOptions(layout="msd", msd_channel=channel, test_fraction=0, val_fraction=0, **SMALL)
    prepare(tmp_path / "raw", tmp_path / "data", options, log=_quiet)
    write_nifti(tmp_path / "ref" / "S" / "prostate_00.nii.gz", [t2, adc][channel])
    write_nifti(tmp_path / "ref" / "S" / "prostate_00_segmentation.nii.gz", label)
    prepare(tmp_path / "ref", tmp_path / "ref_data", PrepareOptions(test_fraction=0, val_fraction=0, **SMALL), log=_quiet)
    for k in range(8):
        got = np.load(tmp_path / "data" / "images" / "MSD" / f"prostate_00_{k:03d}.npy")
        expected = np.load(tmp_path / "ref_data" / "images" / "S" / f"prostate_00_{k:03d}.npy")
        np.testing.assert_array_equal(got, expected)
    labels = np.concatenate([np.load(p) for p in (tmp_path / "data" / "labels" / "MSD").glob("*.npy")])
    assert set(np.unique(labels)) == {0, 1}


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_match_nifti(tmp_path, suffix):
    """The same volume as MetaImage/NRRD (read by ITK, LPS) and NIfTI (read by nibabel) prepares identically."""
    image, label = gland_case(seed=2)
    for name, array in (("Case00", image), ("Case00_segmentation", label)):
        write_nifti(tmp_path / "nii" / "S" / f"{name}.nii.gz", array, np.diag([-0.8, -0.8, 3.0, 1.0]))
        itk_image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        itk_image.SetSpacing((0.8, 0.8, 3.0))  # identity direction in LPS = diag(-1, -1, 1) in RAS
        (tmp_path / "itk" / "S").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(itk_image, str(tmp_path / "itk" / "S" / f"{name}{suffix}"))
    options = PrepareOptions(val_fraction=0, test_fraction=0, **SMALL)
    prepare(tmp_path / "nii", tmp_path / "a", options, log=_quiet)
    prepare(tmp_path / "itk", tmp_path / "b", options, log=_quiet)
    assert _outputs(tmp_path / "a") .keys() == _outputs(tmp_path / "b").keys()
    for name in (tmp_path / "a" / "images" / "S").iterdir():
        np.testing.assert_allclose(np.load(name), np.load(tmp_path / "b" / "images" / "S" / name.name), atol=1e-6)


def test_synthetic_sites_prepare_with_zscore(synthetic_raw, tmp_path):
    options = PrepareOptions(zscore=True, lower_percentile=0.5, upper_percentile=99.5, **SMALL)
    result = prepare(synthetic_raw, tmp_path / "data", options, log=_quiet)
    summary = json.loads((tmp_path / "data" / "prepare.json").read_text())
    stats = summary["statistics"]["zscore"]
    assert sorted(stats) == sorted({c["site"] for c in result.cases})
    # The statistics are those of the site's clipped training volumes, and nothing else.
    site = sorted(stats)[0]
    preparer = prepare_module.Preparer(synthetic_raw, tmp_path / "x", options, log=_quiet)
    records = [r for r in preparer._records() if r.site == site]
    split = prepare_module.split_cases(records, options)
    volumes = [preparer._load(r)["image"].numpy() for r in records if split[(r.site, r.case)] == "training"]
    voxels = np.concatenate([v.ravel() for v in volumes]).astype(np.float64)
    assert stats[site]["mean"] == pytest.approx(voxels.mean(), rel=1e-9)
    assert stats[site]["std"] == pytest.approx(voxels.std(), rel=1e-9)


def test_rerun_is_idempotent(tmp_path):
    raw = write_saml(tmp_path / "raw", sites=("A",), cases=3)
    first = prepare(raw, tmp_path / "data", PrepareOptions(**SMALL), log=_quiet)
    before = _outputs(tmp_path / "data")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "data" / "images").rglob("*.npy")}
    second = prepare(raw, tmp_path / "data", PrepareOptions(**SMALL), log=_quiet)
    assert (first.processed, second.processed, second.reused) == (3, 0, 3)
    assert _outputs(tmp_path / "data") == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    changed = prepare(raw, tmp_path / "data", PrepareOptions(**{**SMALL, "num_slices": 1}), log=_quiet)
    assert changed.processed == 3  # other options: every case redone
    assert np.load(next((tmp_path / "data" / "images" / "A").glob("*.npy"))).shape[0] == 1


def test_interrupted_run_leaves_nothing_trusted(tmp_path, monkeypatch):
    raw = write_saml(tmp_path / "raw", sites=("A",), cases=3)
    prepare(raw, tmp_path / "clean", PrepareOptions(**SMALL), log=_quiet)
    real_save, calls = prepare_module.save_npy, []

    def crash_on_20th(path, array):
        calls.append(path)
        if len(calls) == 20:  # in the middle of the second case
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(prepare_module, "save_npy", crash_on_20th)
    with pytest.raises(KeyboardInterrupt):
        prepare(raw, tmp_path / "data", PrepareOptions(**SMALL), log=_quiet)
    manifests = sorted(p.name for p in (tmp_path / "data" / "cases" / "A").glob("*.json"))
    assert len(manifests) == 1  # the half-written second case has no manifest
    assert not (tmp_path / "data" / "datalists").exists() and not (tmp_path / "data" / "prepare.json").exists()
    assert not [p for p in (tmp_path / "data").rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(prepare_module, "save_npy", real_save)
    resumed = prepare(raw, tmp_path / "data", PrepareOptions(**SMALL), log=_quiet)
    assert (resumed.reused, resumed.processed) == (1, 2)
    assert _outputs(tmp_path / "data") == _outputs(tmp_path / "clean")


def test_missing_sample_file_redoes_the_case(tmp_path):
    raw = write_saml(tmp_path / "raw", sites=("A",), cases=1)
    prepare(raw, tmp_path / "data", PrepareOptions(val_fraction=0, test_fraction=0, **SMALL), log=_quiet)
    victim = next((tmp_path / "data" / "labels" / "A").glob("*.npy"))
    victim.unlink()
    again = prepare(raw, tmp_path / "data", PrepareOptions(val_fraction=0, test_fraction=0, **SMALL), log=_quiet)
    assert again.processed == 1 and victim.is_file()


def test_unknown_site_filter(tmp_path):
    raw = write_saml(tmp_path / "raw", sites=("A",), cases=1)
    with pytest.raises(ValueError, match="sites not found: Z"):
        prepare(raw, tmp_path / "data", PrepareOptions(sites=["Z"], **SMALL), log=_quiet)


def test_drop_empty_and_all_label_slices(tmp_path):
    raw = write_saml(tmp_path / "raw", sites=("A",), cases=1)
    options = PrepareOptions(keep_empty=False, all_label_slices=True, val_fraction=0, test_fraction=0, **{**SMALL, "num_slices": 5})
    result = prepare(raw, tmp_path / "data", options, log=_quiet)
    assert [s["slice"] for s in result.cases[0]["samples"]] == [2, 3, 4, 5]  # the gland covers slices 2..5
    assert np.load(tmp_path / "data" / "labels" / "A" / "Case00_002.npy").shape == (5, 8, 8)


def _write_clinical(raw: Path, site: str, text: str) -> Path:
    path = raw / site / "clinical.csv"
    path.write_text(text)
    return path


def test_clinical_attributes_reach_prepare_json_and_an_edit_reuses_every_sample(tmp_path):
    raw = write_saml(tmp_path / "raw", sites=("A", "B"), cases=3)
    _write_clinical(raw, "A", "case,age,smoker\nCase00,64,no\nCase01,71,yes\nCase02,48,\n")
    options = PrepareOptions(**SMALL)
    prepare(raw, tmp_path / "data", options, log=_quiet)
    summary = json.loads((tmp_path / "data" / "prepare.json").read_text())
    attributes = {(c["site"], c["case"]): c["attributes"] for c in summary["cases"]}
    assert set(attributes["A", "Case00"]) == {*prepare_module.VOLUME_ATTRIBUTES, "age", "smoker"}
    assert (attributes["A", "Case00"]["age"], attributes["A", "Case00"]["smoker"]) == (64, "no")
    assert attributes["A", "Case02"]["age"] == 48 and "smoker" not in attributes["A", "Case02"]
    assert set(attributes["B", "Case00"]) == set(prepare_module.VOLUME_ATTRIBUTES)  # B has no table
    manifest = json.loads((tmp_path / "data" / "cases" / "A" / "Case00.json").read_text())
    assert "age" not in manifest["attributes"]  # clinical data is not part of what the samples depend on

    samples = sorted((tmp_path / "data").glob("*/A/*"))  # sample files and manifests of site A
    mtimes = {p: p.stat().st_mtime_ns for p in samples}
    _write_clinical(raw, "A", "case,age\nCase00,66\nCase02,\n")
    again = prepare(raw, tmp_path / "data", options, log=_quiet)
    assert (again.processed, again.reused) == (0, 6)
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "data").glob("*/A/*"))} == mtimes
    cases = {c.key: c for c in load_prepared_cases(tmp_path / "data")}
    assert cases["A", "Case00"].attributes["age"] == 66
    assert "age" not in cases["A", "Case01"].attributes and "age" not in cases["A", "Case02"].attributes
    assert cases["A", "Case00"].attributes["gland_volume_ml"] == attributes["A", "Case00"]["gland_volume_ml"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("case,age,gland_volume_ml\nCase00,60,31.5\n", "column(s) 'gland_volume_ml' clash with attributes computed"),
        ("case,num_slices\nCase00,12\n", "column(s) 'num_slices' clash"),
        ("case,age\nCase00,60\nCase00,61\n", "case 'Case00' appears twice"),
        ("patient,age\nCase00,60\n", "has no 'case' column"),
    ],
)
def test_bad_clinical_table_stops_prepare_before_any_volume(tmp_path, capsys, text, problem):
    raw = write_saml(tmp_path / "raw", sites=("A",), cases=1)
    table = _write_clinical(raw, "A", text)
    with pytest.raises(DataError, match=re.escape(f"{table}: {problem}")):
        prepare(raw, tmp_path / "data", PrepareOptions(on_error="skip", **SMALL), log=_quiet)
    assert not (tmp_path / "data").exists()
    assert main(["prepare", "--src", str(raw), "--out", str(tmp_path / "data"), "--image-size", "8"]) == 2
    assert f"error: {table}: {problem}" in capsys.readouterr().err


def test_clinical_rows_without_volumes_are_reported(tmp_path):
    raw = write_saml(tmp_path / "raw", sites=("A",), cases=2)
    table = _write_clinical(raw, "A", "case,age\nCase00,60\nCase07,70\nCase01,55\ncase09,80\n")
    lines: list[str] = []
    result = prepare(raw, tmp_path / "data", PrepareOptions(**SMALL), log=lines.append)
    assert lines == [f"warning: {table}: no volumes for case(s) Case07, case09; their rows are ignored"]
    assert [c["attributes"]["age"] for c in result.cases] == [60, 55]


def test_compact_store_writes_small_images_as_they_are_and_training_reads_the_same_tensors(tmp_path):
    from fedfms.bundle import bundle_parser, load_datalist
    from fedfms.distillation.teacher_cache import load_slice
    from monai.transforms import Compose

    raw = write_saml(tmp_path / "raw", sites=("A",), cases=3)  # 20 x 18 in-plane: smaller than 32 x 32
    options = dict(image_size=32, label_size=8, num_slices=3)
    prepare(raw, tmp_path / "compact", PrepareOptions(**options), log=_quiet)
    prepare(raw, tmp_path / "resized", PrepareOptions(image_store="resized", **options), log=_quiet)
    assert json.loads((tmp_path / "compact" / "prepare.json").read_text())["options"]["image_store"] == "compact"
    compact, resized = (sorted((tmp_path / d / "images").rglob("*.npy")) for d in ("compact", "resized"))
    assert [p.name for p in compact] == [p.name for p in resized] and len(compact) == 24
    assert {np.load(p).shape for p in compact} == {(3, 20, 18)} and {np.load(p).shape for p in resized} == {(3, 32, 32)}
    labels = [(tmp_path / d / "labels").rglob("*.npy") for d in ("compact", "resized")]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*(sorted(x) for x in labels)))

    # The bundle's sample chain (RestorePreparedSized, then its own resize) gives the same tensors, within
    # float32 rounding: torch's bilinear kernel may round one ulp differently for 3 channels than for a volume's 8.
    chain = Compose(bundle_parser("bundles/unet_prostate", ["train.json"], image_size=48, label_size=8).get_parsed_content("sample_transforms"))
    for split in ("training", "validation", "testing"):
        for a, b in zip(load_datalist(tmp_path / "compact", split), load_datalist(tmp_path / "resized", split), strict=True):
            x, y = chain(a), chain(b)
            assert x["image"].shape == (3, 48, 48) and torch.equal(x["label"], y["label"])
            assert torch.allclose(x["image"], y["image"], rtol=0, atol=ULP_TOLERANCE)
    # So does the FM-init teacher's reader (the centre slice at the prepared size).
    for a, b in zip(compact, resized):
        assert np.allclose(load_slice(a, image=True), np.load(b)[1], rtol=0, atol=ULP_TOLERANCE)


def test_compact_store_keeps_the_resize_when_it_makes_images_smaller(tmp_path):
    raw = write_saml(tmp_path / "raw", sites=("A",), cases=1)
    prepare(raw, tmp_path / "data", PrepareOptions(image_size=16, label_size=8, num_slices=1), log=_quiet)
    assert {np.load(p).shape for p in (tmp_path / "data" / "images").rglob("*.npy")} == {(1, 16, 16)}


def test_unknown_image_store_is_refused():
    with pytest.raises(ValueError, match="image_store must be one of compact, resized, got 'zip'"):
        PrepareOptions(image_store="zip")
