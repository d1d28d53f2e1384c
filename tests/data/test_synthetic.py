"""Tests for the synthetic multi-site prostate generator (SAML layout)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedfms.data import synthetic
from fedfms.data.synthetic import SITE_PROFILES, synthesize_case, synthesize_prostate

SMALL = (24, 24, 12)
SITES = list(SITE_PROFILES)


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Path, Path]]]:
    """One case per site at the default shapes: what the demo actually writes."""
    out = tmp_path_factory.mktemp("default")
    return out, synthesize_prostate(out, cases_per_site=1)


def test_six_sites_in_saml_order() -> None:
    assert SITES == ["RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"]
    for profile in SITE_PROFILES.values():
        h, w, d = profile.shape
        assert 64 <= h <= 112 and 64 <= w <= 112 and 14 <= d <= 40


def test_layout_names_and_no_temp_files(tmp_path: Path) -> None:
    pairs = synthesize_prostate(tmp_path, sites=2, cases_per_site=3, shape=SMALL)
    expected = [
        (tmp_path / site / f"Case{i:02d}.nii.gz", tmp_path / site / f"Case{i:02d}_segmentation.nii.gz")
        for site in ("RUNMC", "BMC")
        for i in range(3)
    ]
    assert pairs == expected
    on_disk = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk == sorted(p for pair in expected for p in pair)


@pytest.mark.parametrize("index", range(len(SITES)))
def test_volume_is_plausible(default_set: tuple[Path, list[tuple[Path, Path]]], index: int) -> None:
    profile = SITE_PROFILES[SITES[index]]
    image_path, label_path = default_set[1][index]
    assert image_path.parent.name == profile.name
    image, image_nii = _load(image_path)
    label, label_nii = _load(label_path)

    assert image.ndim == 3 and image.shape == label.shape == profile.shape
    assert image.dtype == np.dtype(profile.dtype) and label.dtype == np.uint8
    assert np.isfinite(image.astype(np.float64)).all() and image.min() >= 0 and image.max() > 0
    np.testing.assert_allclose(image_nii.affine, label_nii.affine)
    assert nib.aff2axcodes(image_nii.affine) == tuple(profile.axcodes)
    spacing = (profile.fov_mm / profile.shape[0], profile.fov_mm / profile.shape[1], profile.slice_thickness_mm)
    np.testing.assert_allclose(image_nii.header.get_zooms(), spacing, rtol=1e-5)
    np.testing.assert_allclose(label_nii.header.get_zooms(), spacing, rtol=1e-5)

    allowed = {0, 1, 2} if profile.label_values == "zonal" else {0, 1}
    assert set(np.unique(label)) <= allowed and label.any()
    labelled_slices = label.any(axis=(0, 1))
    assert not labelled_slices[0] and not labelled_slices[-1] and labelled_slices.sum() >= 3
    assert not (label[0].any() or label[-1].any() or label[:, 0].any() or label[:, -1].any())
    # The gland (mostly bright peripheral zone) stands out from the dark rectum behind it.
    assert np.median(image[label > 0]) > np.median(image)


def test_zonal_site_carries_both_zones(default_set: tuple[Path, list[tuple[Path, Path]]]) -> None:
    label, _ = _load(default_set[1][SITES.index("I2CVB")][1])
    assert set(np.unique(label)) == {0, 1, 2}


def test_shape_override_keeps_physical_fov(tmp_path: Path) -> None:
    pairs = synthesize_prostate(tmp_path, sites=["BMC", "I2CVB"], cases_per_site=1, shape=SMALL)
    for (image_path, label_path), site in zip(pairs, ("BMC", "I2CVB")):
        profile = SITE_PROFILES[site]
        image, nii = _load(image_path)
        assert image.shape == _load(label_path)[0].shape == SMALL
        expected = (profile.fov_mm / SMALL[0], profile.fov_mm / SMALL[1], profile.slice_thickness_mm)
        np.testing.assert_allclose(nii.header.get_zooms(), expected, rtol=1e-5)
        assert nib.aff2axcodes(nii.affine) == tuple(profile.axcodes)


def test_deterministic_per_seed_and_independent_of_request(tmp_path: Path) -> None:
    first = synthesize_prostate(tmp_path / "a", sites=["BMC"], cases_per_site=2, seed=3, shape=SMALL)
    again = synthesize_prostate(tmp_path / "b", sites=3, cases_per_site=3, seed=3, shape=SMALL)
    other = synthesize_prostate(tmp_path / "c", sites=["BMC"], cases_per_site=1, seed=4, shape=SMALL)
    bmc = [pair for pair in again if pair[0].parent.name == "BMC"]
    for (img_a, lab_a), (img_b, lab_b) in zip(first, bmc):
        assert np.array_equal(_load(img_a)[0], _load(img_b)[0])
        assert np.array_equal(_load(lab_a)[0], _load(lab_b)[0])
    assert not np.array_equal(_load(first[0][0])[0], _load(other[0][0])[0])
    assert not np.array_equal(_load(first[0][1])[0], _load(other[0][1])[0])
    assert not np.array_equal(_load(first[0][0])[0], _load(first[1][0])[0])


def test_sites_differ(default_set: tuple[Path, list[tuple[Path, Path]]]) -> None:
    (runmc_img, runmc_lab), (bmc_img, bmc_lab) = default_set[1][:2]
    runmc, runmc_nii = _load(runmc_img)
    bmc, bmc_nii = _load(bmc_img)
    runmc_fg = np.median(runmc[_load(runmc_lab)[0] > 0])
    bmc_fg = np.median(bmc[_load(bmc_lab)[0] > 0])
    assert bmc_fg > 1.5 * runmc_fg
    assert runmc.shape != bmc.shape
    assert not np.allclose(runmc_nii.header.get_zooms(), bmc_nii.header.get_zooms())
    assert nib.aff2axcodes(runmc_nii.affine) != nib.aff2axcodes(bmc_nii.affine)
    assert runmc.dtype != bmc.dtype


def test_label_size_distribution_differs_by_site() -> None:
    def mean_gland_ml(site: str) -> float:
        zooms = SITE_PROFILES[site].zooms(SITE_PROFILES[site].shape)
        volumes = [(synthesize_case(site, i)[1] > 0).sum() * np.prod(zooms) / 1000 for i in range(4)]
        return float(np.mean(volumes))

    assert mean_gland_ml("BIDMC") > 1.5 * mean_gland_ml("HK")


def test_noise_level_follows_profile() -> None:
    """A robust estimate (MAD of neighbour differences) recovers each site's relative noise level."""
    for site, profile in SITE_PROFILES.items():
        image = synthesize_case(site, 0)[0].astype(np.float64)
        diff = np.diff(image, axis=0) / np.sqrt(2)
        sigma = 1.4826 * np.median(np.abs(diff - np.median(diff)))
        assert sigma / profile.intensity_scale == pytest.approx(profile.noise_std, rel=0.15), site


def test_bias_field_strength_follows_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """With noise and offset off, biased / unbiased signal is the field: max |log| == bias_strength."""

    def clean(strength: float) -> np.ndarray:
        profile = dataclasses.replace(
            SITE_PROFILES["BMC"], bias_strength=strength, noise_std=0.0, intensity_offset=0.0, dtype="float64"
        )
        monkeypatch.setitem(SITE_PROFILES, "BMC", profile)
        return synthesize_case("BMC", 0, shape=SMALL)[0]

    flat, biased = clean(0.0), clean(0.7)
    log_field = np.log(biased[flat > 0] / flat[flat > 0])
    assert np.abs(log_field).max() == pytest.approx(0.7, abs=0.02)
    assert np.ptp(log_field) > 0.7  # a real spatial variation, not a global gain


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sites": 0}, "got 0"),
        ({"sites": 7}, "got 7"),
        ({"sites": ["RUNMC", "NOPE"]}, "'NOPE'"),
        ({"sites": []}, "empty"),
        ({"cases_per_site": 0}, "got 0"),
        ({"shape": (24, 24, 4)}, "(24, 24, 4)"),
        ({"shape": (24, 24)}, "(24, 24)"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        synthesize_prostate(tmp_path, **{"cases_per_site": 1, "shape": SMALL, **kwargs})


def test_bad_profile_is_rejected() -> None:
    profile = SITE_PROFILES["RUNMC"]
    for field, value in (("axcodes", "LRS"), ("axcodes", "SAR"), ("label_values", "multi"), ("dtype", "bool")):
        with pytest.raises(ValueError, match=re.escape(repr(value))):
            dataclasses.replace(profile, **{field: value})


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        synthesize_prostate(tmp_path, sites=1, cases_per_site=1, shape=SMALL)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []

