"""Find the (image, label) pairs of a raw dataset in one of the public layouts.

Layouts:
    ``saml``:   ``<SITE>/CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz`` (or ``_Segmentation``), the
                multi-site prostate release used by SAML, FedFMS and FLAP-SAM.
    ``fedfms``: ``<site>/images/<name>`` + ``<site>/labels/<name>`` with equal file names.
    ``msd``:    Medical Segmentation Decathlon task folder with ``dataset.json``; images may be 4D
                (multi-parametric), the channel to use is recorded on each case.

Readers only look at file names; they do not open volumes. A case whose label is missing is
still returned (``label=None``) so that the caller can report it as bad input. A folder with no
case in the asked layout is reported with the layout it looks like (:func:`detect_layout`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedfms.errors import DataError
from fedfms.io import load_json, strip_volume_suffix, volume_suffix

LAYOUTS = ("saml", "fedfms", "msd")
SAML_LABEL_TAGS = ("_segmentation", "_Segmentation")
LAYOUT_SHAPES = {
    "saml": "SRC/<SITE>/CaseNN.nii.gz with CaseNN_segmentation.nii.gz",
    "fedfms": "SRC/<site>/images/<name> with SRC/<site>/labels/<name>",
    "msd": "SRC/dataset.json indexing SRC/imagesTr and SRC/labelsTr",
}


@dataclass(frozen=True)
class CaseRecord:
    """One raw case: where its files are and which site it belongs to."""

    site: str
    case: str
    image: Path
    label: Path | None
    channel: int | None = None  # channel of a multi-channel image to use (MSD); None for 3D images


def find_cases(src: str | os.PathLike, layout: str, *, msd_site: str = "MSD", msd_channel: int = 0) -> list[CaseRecord]:
    """All cases under ``src`` in ``layout``, sorted by site then case."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "source folder not found")
    if layout == "saml":
        records = _find_saml(src)
    elif layout == "fedfms":
        records = _find_fedfms(src)
    elif layout == "msd":
        if not (src / "dataset.json").is_file():
            raise DataError(src, "no dataset.json here, so this is not a Medical Segmentation Decathlon task folder (--layout msd)" + _layout_hint(src, layout))
        records = _find_msd(src, msd_site, msd_channel)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not records:
        raise DataError(src, f"no volumes found in the {layout!r} layout ({LAYOUT_SHAPES[layout]})" + _layout_hint(src, layout))
    return sorted(records, key=lambda r: (r.site, r.case))


def detect_layout(src: str | os.PathLike) -> str | None:
    """The raw layout the folder ``src`` looks like, from names only: ``msd``, ``fedfms``, ``saml``, or None."""
    src = Path(src)
    if not src.is_dir():
        return None
    if (src / "dataset.json").is_file() or (src / "imagesTr").is_dir():
        return "msd"
    sites = _site_dirs(src)
    if any((site / "images").is_dir() and _volumes(site / "images") for site in sites):
        return "fedfms"
    if any(_volumes(site) for site in sites):
        return "saml"
    return None


def is_prepared(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is the output of ``fedfms prepare`` (prepared samples, not raw volumes)."""
    return (Path(folder) / "prepare.json").is_file() and (Path(folder) / "datalists").is_dir()


def _layout_hint(src: Path, layout: str) -> str:
    """What ``src`` holds instead of cases in ``layout``, and the flag to change (empty if nothing is recognised)."""
    if is_prepared(src):
        return "; it is a prepared dataset (the output of `fedfms prepare`): pass the raw data folder as --src (bundles read this one as --dataset_dir)"
    found = detect_layout(src)
    if found and found != layout:
        return f"; it looks like the {found!r} layout ({LAYOUT_SHAPES[found]}): pass --layout {found}"
    if found == "msd" and not (src / "dataset.json").is_file():
        return f"; an MSD task folder needs its dataset.json ({LAYOUT_SHAPES['msd']})"
    if _volumes(src):
        return f"; its volumes lie directly in it, as in one site's folder: pass the folder above it as --src, or move them into a site folder (--layout saml expects {LAYOUT_SHAPES['saml']})"
    return ""


def _volumes(folder: Path) -> list[Path]:
    """Visible volume files directly in ``folder`` (temporary files start with a dot)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and volume_suffix(p))


def _site_dirs(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_saml(src: Path) -> list[CaseRecord]:
    records = []
    for site_dir in _site_dirs(src):
        volumes = _volumes(site_dir)
        by_stem = {strip_volume_suffix(p): p for p in volumes}
        for stem, image in by_stem.items():
            if stem.endswith(SAML_LABEL_TAGS):
                continue
            label = next((by_stem[stem + tag] for tag in SAML_LABEL_TAGS if stem + tag in by_stem), None)
            records.append(CaseRecord(site_dir.name, stem, image, label))
    return records


def _find_fedfms(src: Path) -> list[CaseRecord]:
    records = []
    for site_dir in _site_dirs(src):
        if not (site_dir / "images").is_dir():
            continue
        for image in _volumes(site_dir / "images"):
            label = site_dir / "labels" / image.name
            records.append(CaseRecord(site_dir.name, strip_volume_suffix(image), image, label if label.is_file() else None))
    return records


def _find_msd(src: Path, site: str, channel: int) -> list[CaseRecord]:
    index_path = src / "dataset.json"
    index = load_json(index_path)
    if not isinstance(index, dict) or not isinstance(index.get("training"), list):
        raise DataError(index_path, "has no 'training' list; is this a Medical Segmentation Decathlon task folder?")
    records = []
    for item in index["training"]:
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(index_path, f"training entry without an 'image': {item!r}")
        image = (src / item["image"]).resolve()
        label = (src / item["label"]).resolve() if item.get("label") else None
        records.append(CaseRecord(site, strip_volume_suffix(image), image, label if label and label.is_file() else None, channel))
    return records
