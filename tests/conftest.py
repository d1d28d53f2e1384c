"""Shared fixtures: small volumes written in the raw layouts the readers support."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedfms.data.synthetic import synthesize_prostate

# Oblique-free but flipped orientation (LPS), as DICOM-derived NIfTI files often are.
LPS_AFFINE = np.diag([-0.8, -0.8, 3.0, 1.0])


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def gland_case(shape=(20, 18, 8), seed=0, label_value=1) -> tuple[np.ndarray, np.ndarray]:
    """A random image with a box-shaped gland label covering the middle slices only."""
    rng = np.random.default_rng(seed)
    image = (rng.random(shape) * 800 + 100).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[5:12, 4:10, 2:6] = label_value
    return image, label


def write_saml(root: Path, sites=("A", "B"), cases=4, shape=(20, 18, 8)) -> Path:
    for s, site in enumerate(sites):
        for c in range(cases):
            image, label = gland_case(shape, seed=10 * s + c)
            write_nifti(root / site / f"Case{c:02d}.nii.gz", image)
            tag = "_segmentation" if c % 2 == 0 else "_Segmentation"  # the release mixes both
            write_nifti(root / site / f"Case{c:02d}{tag}.nii.gz", label)
    return root


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """Three synthetic sites, four small cases each, in the SAML layout."""
    root = tmp_path_factory.mktemp("raw")
    synthesize_prostate(root, sites=3, cases_per_site=4, seed=1, shape=(32, 32, 12))
    return root
