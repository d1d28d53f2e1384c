"""Per-site clinical tables: patient metadata exported beside the volumes, one CSV per site.

Hospitals export clinical metadata (age, PSA, Gleason grade, ...) as a spreadsheet next to the
images. ``fedfms prepare`` reads it into each case's attributes, so that attribute-skewed partitions
(e.g. the age skew of the FM-instructed initialisation paper) can be drawn from real metadata.

Where the table of a site is (the table is optional; a site without one has no clinical attributes):

    ``saml``, ``fedfms``:  ``<src>/<SITE>/clinical.csv``
    ``msd``:               ``<src>/clinical.csv``, for the MSD site name (``--msd-site``)

The table has a header row with a ``case`` column (the image file name without its volume suffix,
e.g. ``Case00``) and any other columns. Numeric cells become numbers (``int`` when written without a
fraction or exponent, else ``float``), other cells stay strings, empty cells are left out. An
optional ``site`` column must name the table's own site. Problems raise
:class:`~fedfms.errors.DataError` naming the file.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedfms.errors import DataError

__all__ = ["CLINICAL_FILE", "ClinicalTable", "clinical_table_path", "read_clinical", "read_clinical_table"]

CLINICAL_FILE = "clinical.csv"
CASE_COLUMN = "case"
SITE_COLUMN = "site"

Value = int | float | str
CaseKey = tuple[str, str]  # (site, case)

# Plain decimal numbers only: Python's float() would also take "nan", "inf" and "1_000", which a
# spreadsheet means as text (or as a missing value), never as a number to sort patients by.
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class ClinicalTable:
    """One site's table: its attribute columns and, per case, the non-empty cells."""

    path: Path
    site: str
    columns: tuple[str, ...]  # attribute columns, without ``case`` and ``site``
    rows: dict[str, dict[str, Value]]  # case -> {column: value}


def clinical_table_path(src: str | os.PathLike, layout: str, site: str, msd_site: str = "MSD") -> Path | None:
    """Where the table of ``site`` is in ``layout``; None where the layout has no place for it."""
    if layout == "msd":
        return Path(src) / CLINICAL_FILE if site == msd_site else None
    return Path(src) / site / CLINICAL_FILE


def read_clinical(
    src: str | os.PathLike,
    layout: str,
    sites: Iterable[str],
    *,
    msd_site: str = "MSD",
    reserved: Sequence[str] = (),
) -> dict[CaseKey, dict[str, Value]]:
    """``{(site, case): {column: value}}`` from the tables of ``sites`` that exist under ``src``.

    ``reserved`` names attributes computed elsewhere (e.g. from the volumes); a table column of the
    same name would silently replace or be replaced by them, so it is an error naming the table.
    """
    attributes: dict[CaseKey, dict[str, Value]] = {}
    for site in sites:
        path = clinical_table_path(src, layout, site, msd_site)
        if path is None or not path.is_file():
            continue
        table = read_clinical_table(path, site)
        clashes = [c for c in table.columns if c in reserved]
        if clashes:
            names = ", ".join(map(repr, clashes))
            raise DataError(path, f"column(s) {names} clash with attributes computed from the volumes; rename them")
        attributes.update({(site, case): row for case, row in table.rows.items()})
    return attributes


def read_clinical_table(path: str | os.PathLike, site: str) -> ClinicalTable:
    """Read one site's table; see the module docstring for the format."""
    path = Path(path)
    header, body = _read_rows(path)
    columns = _check_header(path, header)
    rows: dict[str, dict[str, Value]] = {}
    first_line: dict[str, int] = {}
    for line, cells in body:
        if len(cells) > len(header):
            raise DataError(path, f"line {line} has {len(cells)} cells but the header has {len(header)} columns")
        record = dict(zip(header, (cell.strip() for cell in cells)))
        if not any(record.values()):
            continue  # a blank spreadsheet row
        case = record.get(CASE_COLUMN, "")
        if not case:
            raise DataError(path, f"line {line} has no case")
        if case in rows:
            raise DataError(path, f"case {case!r} appears twice, on lines {first_line[case]} and {line}")
        if record.get(SITE_COLUMN, site) not in ("", site):
            raise DataError(path, f"line {line} names site {record[SITE_COLUMN]!r}, but this is the table of site {site!r}")
        first_line[case] = line
        rows[case] = {c: _value(record[c]) for c in columns if record.get(c)}
    return ClinicalTable(path, site, columns, rows)


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The stripped header and the (line number, cells) of every further row."""
    try:
        # utf-8-sig: spreadsheet programs often start a UTF-8 export with a byte-order mark.
        # strict: a broken quote is an error, not a cell that swallows the rest of the file.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            rows = [(reader.line_num, cells) for cells in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"cannot be read as a CSV table ({type(err).__name__}: {err})") from err
    if not rows:
        raise DataError(path, f"is empty; expected a header row with a {CASE_COLUMN!r} column")
    header = [name.strip() for name in rows[0][1]]
    return header, rows[1:]


def _check_header(path: Path, header: list[str]) -> tuple[str, ...]:
    """The attribute columns of a valid header (names unique and non-empty, ``case`` among them)."""
    if CASE_COLUMN not in header:
        raise DataError(path, f"has no {CASE_COLUMN!r} column (header: {', '.join(header) or 'empty'})")
    if "" in header:
        raise DataError(path, f"column {header.index('') + 1} of the header has no name")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(path, f"column(s) {', '.join(map(repr, duplicates))} appear more than once in the header")
    return tuple(name for name in header if name not in (CASE_COLUMN, SITE_COLUMN))


def _value(text: str) -> Value:
    if _INTEGER.fullmatch(text):
        return int(text)
    if _NUMBER.fullmatch(text):
        return float(text)
    return text
