"""Synthetic multi-site prostate T2 MRI in the SAML release layout.

Real multi-site prostate data (SAML: RUNMC, BMC, I2CVB, UCL, BIDMC, HK) cannot be downloaded at run
time, yet the pipeline must be demoed and tested end to end on a CPU. This module writes small
volumes that look like axial T2-weighted pelvic MRI and that differ between sites the way real
sites do (scanner gain and offset, coil bias, noise, matrix size, slice thickness, voxel spacing,
affine orientation, on-disk dtype, label convention and gland size), so that preprocessing,
orientation handling and federated training meet the same heterogeneity they meet on real data.

Each case also has a patient age, exported beside the volumes the way hospitals export clinical
metadata, so that ``fedfms partition --method attribute --attribute age`` can simulate the age skew
of the FM-instructed initialisation paper. Ages are whole years drawn uniformly from ``AGE_RANGE``
(45 to 80, the span of prostate MRI cohorts) by a random generator of their own, so the anatomy,
bias field and noise of a case are drawn exactly as before ages existed. Age also shapes the label,
as benign prostatic hyperplasia does on real data: the gland volume grows by
``GLAND_GROWTH_PER_YEAR`` = 2.5 % a year (the rate longitudinal MRI studies of ageing men report),
i.e. the nominal volume is multiplied by ``exp(0.025 * (age - 60))`` (0.69 at 45, 1.65 at 80) and
the linear size by its cube root, on top of the site's own ``gland_scale`` variation. An age skew
is therefore also a skew of the label distribution.

Layout written::

    <out_dir>/<SITE>/CaseNN.nii.gz                 image
    <out_dir>/<SITE>/CaseNN_segmentation.nii.gz    label
    <out_dir>/<SITE>/clinical.csv                  columns ``case,age``: one row per case written
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt

from fedfms.data.clinical import CLINICAL_FILE
from fedfms.io import atomic_write, save_csv

__all__ = [
    "AGE_RANGE",
    "GLAND_GROWTH_PER_YEAR",
    "SITE_PROFILES",
    "SiteProfile",
    "gland_volume_factor",
    "patient_age",
    "synthesize_case",
    "synthesize_prostate",
]

AGE_RANGE = (45, 80)  # years, inclusive
GLAND_GROWTH_PER_YEAR = 0.025  # relative gland volume growth per year of age (BPH)
_REFERENCE_AGE = 60.0  # the age at which the gland has its nominal size
_AGE_STREAM = 1  # last seed word of the age stream; the image stream is seeded without it

_MIN_SIZE = 8
_EDGE_MM = 0.7  # half-width of the partial-volume blur at tissue boundaries
_LABEL_VALUES = ("binary", "zonal")

# Relative T2-weighted signal of each tissue before the scanner gain is applied.
_FAT, _MUSCLE, _PELVIC_FAT = 0.75, 0.30, 0.52
_MARROW, _CORTEX = 0.55, 0.08
_RECTAL_WALL, _RECTAL_LUMEN, _URINE = 0.20, 0.04, 1.00
_CAPSULE, _PERIPHERAL_ZONE, _CENTRAL_GLAND = 0.15, 0.80, 0.36
_CAPSULE_MM = 1.5


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(n) != n or n < _MIN_SIZE for n in shape):
        raise ValueError(f"shape must be three integers >= {_MIN_SIZE} (H, W, D), got {tuple(shape)!r}")
    return tuple(int(n) for n in shape)  # type: ignore[return-value]


def _orientation(axcodes: str) -> np.ndarray:
    """Orientation rows (world axis, sign) per voxel axis; the last voxel axis must be the slice (S/I) axis."""
    ornt = axcodes2ornt(tuple(axcodes)) if len(axcodes) == 3 else None
    if ornt is None or sorted(ornt[:, 0]) != [0, 1, 2] or ornt[2, 0] != 2:
        raise ValueError(f"axcodes must name R/L, A/P in-plane and S/I last, got {axcodes!r}")
    return ornt.astype(int)


@dataclass(frozen=True)
class SiteProfile:
    """How one site's scanner and protocol differ; validated so a typo fails at import, not mid-run."""

    name: str
    shape: tuple[int, int, int]
    fov_mm: float
    slice_thickness_mm: float
    axcodes: str
    intensity_scale: float
    intensity_offset: float
    bias_strength: float
    noise_std: float
    gland_scale: tuple[float, float]
    label_values: str
    dtype: str

    def __post_init__(self) -> None:
        _check_shape(self.shape)
        _orientation(self.axcodes)
        if self.label_values not in _LABEL_VALUES:
            raise ValueError(f"label_values must be one of {_LABEL_VALUES}, got {self.label_values!r}")
        if np.dtype(self.dtype).kind not in "iuf":
            raise ValueError(f"dtype must be an integer or float type, got {self.dtype!r}")

    def zooms(self, shape: tuple[int, int, int]) -> tuple[float, float, float]:
        """Voxel size (mm) for a matrix: the field of view is physical, so spacing follows the matrix."""
        return (self.fov_mm / shape[0], self.fov_mm / shape[1], self.slice_thickness_mm)


SITE_PROFILES: dict[str, SiteProfile] = {
    p.name: p
    for p in (
        # name, shape, fov_mm, slice_thickness_mm, axcodes, intensity_scale, intensity_offset,
        # bias_strength, noise_std, gland_scale, label_values, dtype
        # 3T, surface coil (ISBI 2013 "Radboud").
        SiteProfile("RUNMC", (96, 96, 20), 220.0, 3.6, "RAS", 1000.0, 0.0, 0.25, 0.03, (1.00, 0.10), "binary", "int16"),
        # 1.5T with endorectal coil (ISBI 2013 "Boston"): small FOV, strong coil bias, noisy.
        SiteProfile("BMC", (80, 80, 24), 140.0, 3.0, "LPS", 2400.0, 60.0, 0.70, 0.06, (1.15, 0.15), "binary", "uint16"),
        # 3T, thin slices, zonal annotation, float images.
        SiteProfile("I2CVB", (64, 64, 40), 150.0, 1.25, "LAS", 1.0, 0.0, 0.30, 0.04, (0.90, 0.08), "zonal", "float32"),
        SiteProfile("UCL", (72, 72, 26), 180.0, 3.5, "RPI", 420.0, 30.0, 0.35, 0.05, (1.05, 0.12), "binary", "int16"),
        # 3T with endorectal coil.
        SiteProfile("BIDMC", (112, 112, 16), 160.0, 4.0, "LPI", 1600.0, 0.0, 0.60, 0.045, (1.20, 0.15), "binary", "uint16"),
        SiteProfile("HK", (88, 88, 22), 240.0, 3.3, "RPS", 280.0, 12.0, 0.20, 0.025, (0.85, 0.08), "binary", "float32"),
    )
}


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre world coordinates (mm, RAS: x right, y anterior, z superior), volume centre at 0."""

    coords: tuple[np.ndarray, np.ndarray, np.ndarray]  # each broadcastable to `shape`
    step: tuple[float, float, float]  # voxel size along world x, y, z
    half: tuple[float, float, float]  # half the field of view along world x, y, z
    shape: tuple[int, int, int]
    affine: np.ndarray

    def snap(self, axis: int, value: float) -> float:
        """Nearest voxel centre, so a structure centred there always covers at least one voxel."""
        centres = self.coords[axis].ravel()
        return float(centres[np.argmin(np.abs(centres - value))])


def _grid(profile: SiteProfile, shape: tuple[int, int, int]) -> _Grid:
    zooms = profile.zooms(shape)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    coords: list[np.ndarray] = [np.zeros(1)] * 3
    step, half = [0.0] * 3, [0.0] * 3
    for axis, (world, sign) in enumerate(_orientation(profile.axcodes)):
        n = shape[axis]
        centred = (np.arange(n) - (n - 1) / 2) * zooms[axis] * sign
        coords[world] = centred.reshape([n if a == axis else 1 for a in range(3)])
        affine[world, axis] = sign * zooms[axis]
        affine[world, 3] = centred[0]
        step[world], half[world] = zooms[axis], n * zooms[axis] / 2
    return _Grid(tuple(coords), tuple(step), tuple(half), shape, affine)  # type: ignore[arg-type]


def _ellipsoid(grid: _Grid, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm, negative inside); an infinite radius makes a cylinder."""
    r2 = sum(((c - c0) / r) ** 2 for c, c0, r in zip(grid.coords, centre, radii))
    return (np.sqrt(r2) - 1.0) * min(r for r in radii if np.isfinite(r))


def _paint(image: np.ndarray, distance: np.ndarray, value: float) -> None:
    """Overlay a tissue with a soft edge, mimicking partial-volume blur."""
    weight = 0.5 * (1.0 - np.tanh(distance / _EDGE_MM))
    image += weight * (value - image)


def _gland(
    rng: np.random.Generator, profile: SiteProfile, grid: _Grid, age: float
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float, float]]:
    """Signed distances of the gland and its central gland, plus (x0, y0, z0, b, c) to place neighbours.

    The gland is a lobulated, apex-tapered ellipsoid centred on a voxel centre (so the label is never
    empty), enlarged with age (BPH) on top of the site's size variation, and shrunk if needed so it
    stays inside the volume with at least one empty slice at each end.
    """
    site_scale = float(np.clip(rng.normal(*profile.gland_scale), 0.7, 1.3))
    a = 22.0 * site_scale * float(np.cbrt(gland_volume_factor(age)))  # 44 mm nominal width at 60
    b, c = a * rng.uniform(0.65, 0.8), a * rng.uniform(0.75, 0.95)
    taper = rng.uniform(0.05, 0.2)
    amps, phases = rng.uniform(0.0, 0.05, 3), rng.uniform(0.0, 2 * np.pi, 3)
    lobe_max = 1.0 + amps.sum()
    x0 = grid.snap(0, rng.uniform(-4.0, 4.0))
    y0 = grid.snap(1, rng.uniform(-4.0, 4.0))
    z0 = grid.snap(2, int(rng.integers(-1, 2)) * grid.step[2])
    (sx, sy, sz), (hx, hy, hz) = grid.step, grid.half
    reach = (1.0 + taper) * lobe_max
    fit = min(1.0, (hx - sx - abs(x0)) / (a * reach), (hy - sy - abs(y0)) / (b * reach))
    a, b = a * fit, b * fit
    c = min(c, (hz - sz - abs(z0)) / lobe_max)

    x, y, z = (coord - c0 for coord, c0 in zip(grid.coords, (x0, y0, z0)))
    widen = 1.0 + taper * np.clip(z / c, -1.0, 1.0)  # base (superior) wider than apex
    theta = np.arctan2(y / b, x / a)
    lobes = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in zip((2, 3, 4), amps, phases))
    radius = np.sqrt((x / (a * widen)) ** 2 + (y / (b * widen)) ** 2 + (z / c) ** 2) / lobes
    gland = (radius - 1.0) * min(a, b, c)
    central = _ellipsoid(grid, (x0, y0 + 0.3 * b, z0 + 0.2 * c), (0.62 * a, 0.55 * b, 0.8 * c))
    return gland, np.maximum(gland, central), (x0, y0, z0, b, c)


def _anatomy(rng: np.random.Generator, profile: SiteProfile, grid: _Grid, age: float) -> tuple[np.ndarray, np.ndarray]:
    """Relative T2 signal and label: body, pelvic muscles and fat, femoral heads, rectum, bladder, gland."""
    gland, central, (x0, y0, z0, b, c) = _gland(rng, profile, grid, age)
    inf = np.inf
    tissue = np.zeros(grid.shape)
    body = (rng.uniform(150.0, 180.0), rng.uniform(105.0, 130.0), inf)
    _paint(tissue, _ellipsoid(grid, (0.0, 15.0, 0.0), body), _FAT)
    fat_layer = rng.uniform(15.0, 30.0)
    _paint(tissue, _ellipsoid(grid, (0.0, 15.0, 0.0), (body[0] - fat_layer, body[1] - fat_layer, inf)), _MUSCLE)
    pelvis = (rng.uniform(60.0, 70.0), rng.uniform(45.0, 55.0), inf)
    _paint(tissue, _ellipsoid(grid, (x0, y0 - 5.0, 0.0), pelvis), _PELVIC_FAT)
    head_r, head_x, head_z = rng.uniform(21.0, 25.0), rng.uniform(85.0, 95.0), z0 + c + rng.uniform(0.0, 10.0)
    for side in (-1.0, 1.0):
        centre = (x0 + side * head_x, y0 + 5.0, head_z)
        _paint(tissue, _ellipsoid(grid, centre, (head_r + 2.5,) * 3), _CORTEX)
        _paint(tissue, _ellipsoid(grid, centre, (head_r,) * 3), _MARROW)
    rectum = np.array([rng.uniform(14.0, 20.0), rng.uniform(10.0, 14.0), inf])
    rectum_centre = (x0, y0 - b - rectum[1] - 1.0, 0.0)
    _paint(tissue, _ellipsoid(grid, rectum_centre, rectum), _RECTAL_WALL)
    _paint(tissue, _ellipsoid(grid, rectum_centre, rectum * 0.45), _RECTAL_LUMEN)
    bladder = (rng.uniform(25.0, 45.0), rng.uniform(20.0, 35.0), rng.uniform(18.0, 30.0))
    _paint(tissue, _ellipsoid(grid, (x0, y0 + 0.3 * (b + bladder[1]), z0 + 0.8 * c + bladder[2]), bladder), _URINE)
    _paint(tissue, gland - _CAPSULE_MM, _CAPSULE)
    _paint(tissue, gland, _PERIPHERAL_ZONE)
    _paint(tissue, central, _CENTRAL_GLAND)

    inside = gland < 0
    if profile.label_values == "binary":
        return tissue, inside.astype(np.uint8)
    return tissue, np.where(inside, np.where(central < 0, 1, 2), 0).astype(np.uint8)


def _bias_field(rng: np.random.Generator, grid: _Grid, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(strength * p) with p a random quadratic scaled to max |p| = 1."""
    u, v, w = (coord / 100.0 for coord in grid.coords)
    terms = (u, v, w, u * u, v * v, u * v, u * w)
    poly = np.broadcast_to(sum(k * t for k, t in zip(rng.normal(size=len(terms)), terms)), grid.shape)
    return np.exp(strength * poly / max(float(np.abs(poly).max()), 1e-9))


def _acquire(rng: np.random.Generator, tissue: np.ndarray, profile: SiteProfile, grid: _Grid) -> np.ndarray:
    """Scanner gain and coil bias multiply the signal; the offset and noise do not, as on real scanners."""
    signal = profile.intensity_scale * tissue * _bias_field(rng, grid, profile.bias_strength)
    signal += profile.intensity_offset
    signal += rng.normal(0.0, profile.noise_std * profile.intensity_scale, grid.shape)
    np.clip(signal, 0.0, None, out=signal)
    dtype = np.dtype(profile.dtype)
    if dtype.kind == "f":
        return signal.astype(dtype)
    return np.clip(np.rint(signal), 0, np.iinfo(dtype).max).astype(dtype)


def _site_index(site: str) -> int:
    names = list(SITE_PROFILES)
    if site not in SITE_PROFILES:
        raise ValueError(f"unknown site {site!r}; known sites: {names}")
    return names.index(site)


def patient_age(site: str, case_index: int, seed: int = 0) -> int:
    """Age in whole years of a case's patient, uniform over ``AGE_RANGE``.

    Drawn from its own generator, seeded by (seed, site index, case index, 1), so the image generator
    (seeded by (seed, site index, case index)) draws exactly what it drew before ages existed.
    """
    _check_non_negative("seed", seed)
    _check_non_negative("case_index", case_index)
    rng = np.random.default_rng([seed, _site_index(site), case_index, _AGE_STREAM])
    low, high = AGE_RANGE
    return int(rng.integers(low, high, endpoint=True))


def gland_volume_factor(age: float) -> float:
    """Gland volume relative to a 60-year-old's: ``exp(GLAND_GROWTH_PER_YEAR * (age - 60))``."""
    return float(np.exp(GLAND_GROWTH_PER_YEAR * (age - _REFERENCE_AGE)))


def synthesize_case(
    site: str, case_index: int, seed: int = 0, shape: Sequence[int] | None = None, age: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image, uint8 label, affine) of one case, in memory.

    The generator is seeded by (seed, site index, case index), so a case does not depend on which
    other sites or cases are generated with it. ``age`` (years) defaults to
    :func:`patient_age`; passing another age gives the same patient with a gland sized for that age.
    """
    site_index = _site_index(site)
    _check_non_negative("seed", seed)
    _check_non_negative("case_index", case_index)
    if age is None:
        age = patient_age(site, case_index, seed)
    elif not 0 <= age <= 120:
        raise ValueError(f"age must be between 0 and 120 years, got age={age!r}")
    profile = SITE_PROFILES[site]
    grid = _grid(profile, profile.shape if shape is None else _check_shape(shape))
    rng = np.random.default_rng([seed, site_index, case_index])
    tissue, label = _anatomy(rng, profile, grid, age)
    return _acquire(rng, tissue, profile, grid), label, grid.affine


def _check_non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value!r}")


def _site_names(sites: int | str | Sequence[str]) -> list[str]:
    names = list(SITE_PROFILES)
    if isinstance(sites, (int, np.integer)) and not isinstance(sites, bool):
        if not 1 <= sites <= len(names):
            raise ValueError(f"sites must be between 1 and {len(names)}, got {sites}")
        return names[:sites]
    requested = [sites] if isinstance(sites, str) else list(sites)
    if not requested:
        raise ValueError("sites must name at least one site, got an empty sequence")
    for name in requested:
        if name not in SITE_PROFILES:
            raise ValueError(f"unknown site {name!r}; known sites: {names}")
    return list(dict.fromkeys(requested))


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI volume atomically, with the geometry in both qform and sform as scanners do."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code="scanner")
    image.set_sform(affine, code="scanner")
    image.header.set_zooms(tuple(nib.affines.voxel_sizes(affine)))
    image.header.set_xyzt_units("mm")
    atomic_write(path, lambda tmp: nib.save(image, tmp))


def synthesize_prostate(
    out_dir: str | os.PathLike[str],
    sites: int | str | Sequence[str] = 6,
    cases_per_site: int = 6,
    seed: int = 0,
    shape: Sequence[int] | None = None,
) -> list[tuple[Path, Path]]:
    """Write out_dir/<SITE>/CaseNN.nii.gz + CaseNN_segmentation.nii.gz; return (image, label) paths.

    Each site also gets ``clinical.csv`` (columns ``case,age``) listing the cases written, the way a
    hospital exports clinical metadata beside the images; ``fedfms prepare`` reads it into the
    case attributes. `sites` is a count N (the first N of SITE_PROFILES) or site names; `shape`
    (H, W, D) overrides every site's matrix while its field of view stays physical, so spacing
    becomes fov_mm / H.
    """
    names = _site_names(sites)
    _check_non_negative("seed", seed)
    if isinstance(cases_per_site, bool) or not isinstance(cases_per_site, (int, np.integer)) or cases_per_site < 1:
        raise ValueError(f"cases_per_site must be an integer >= 1, got {cases_per_site!r}")
    if shape is not None:
        shape = _check_shape(shape)
    written: list[tuple[Path, Path]] = []
    for site in names:
        site_dir = Path(out_dir) / site
        site_dir.mkdir(parents=True, exist_ok=True)
        clinical = []
        for case in range(cases_per_site):
            age = patient_age(site, case, seed)
            image, label, affine = synthesize_case(site, case, seed=seed, shape=shape, age=age)
            name = f"Case{case:02d}"
            image_path = site_dir / f"{name}.nii.gz"
            label_path = site_dir / f"{name}_segmentation.nii.gz"
            _save(image, affine, image_path)
            _save(label, affine, label_path)
            written.append((image_path, label_path))
            clinical.append({"case": name, "age": age})
        save_csv(site_dir / CLINICAL_FILE, clinical, ("case", "age"))
    return written
