"""Reading volumes through MONAI's readers and writing outputs atomically."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfms.errors import DataError

if TYPE_CHECKING:
    from monai.data import MetaTensor

# torch and MONAI are imported where they are used: this module serves light commands too
# (`fedfms report`, `synth`, `simulate`), which would otherwise start 10+ s slower.

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def volume_suffix(path: str | os.PathLike) -> str | None:
    """The recognised volume suffix of ``path`` (``.nii.gz`` counts as one), else None."""
    name = str(path).lower()
    return next((s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def strip_volume_suffix(path: str | os.PathLike) -> str:
    """File name of ``path`` without its volume suffix: ``Case00.nii.gz`` -> ``Case00``."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def load_volume(path: str | os.PathLike) -> MetaTensor:
    """Load one volume as a float32 MetaTensor (no channel added): NIfTI through nibabel, MetaImage/NRRD through ITK.

    Raises:
        DataError: the file is missing, has an unknown suffix, or cannot be decoded (corrupt or truncated).
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if suffix is None:
        raise DataError(path, f"unknown volume format; expected one of {', '.join(VOLUME_SUFFIXES)}")
    from monai.data import ITKReader, NibabelReader
    from monai.transforms import LoadImage

    reader = NibabelReader() if suffix in NIFTI_SUFFIXES else ITKReader()
    try:
        return LoadImage(reader=reader, image_only=True, dtype=np.float32)(path)
    except Exception as err:  # nibabel/ITK/zlib raise many types for a damaged file
        raise DataError(path, f"cannot be read, the file is corrupt or truncated ({type(err).__name__}: {err})") from err


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A reader never sees a half-written file: either the old content or the complete new one.
    The temporary name keeps the final suffix, so writers that choose a format by suffix still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write ``rows`` as CSV with a header of ``columns`` (other keys ignored), atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy``, atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(path, f"is not valid JSON ({err})") from err


def load_torch_file(path: str | os.PathLike, missing: str, what: str, weights_only: bool = True) -> Any:
    """``torch.load`` of a local file on the CPU; a missing or unreadable file is a :class:`DataError`.

    ``missing`` is the problem reported for a missing file; ``what`` names what the file should be.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, missing)
    try:
        import torch

        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # pickle, zip and torch errors all mean an unreadable file
        raise DataError(path, f"cannot be read as {what} ({type(err).__name__}: {err})") from err


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
