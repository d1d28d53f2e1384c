"""Per-site clinical tables: where each layout keeps them, how cells are read, and what is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedfms.data.clinical import CLINICAL_FILE, clinical_table_path, read_clinical, read_clinical_table
from fedfms.errors import DataError


def _table(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_cells_become_numbers_strings_or_nothing(tmp_path: Path) -> None:
    # A spreadsheet export: byte-order mark, padded cells, a blank row, an empty cell, text that
    # float() would take for a number (nan, inf, 1_000) but a spreadsheet means as text.
    text = "case, age ,psa,gleason,note\nCase00,67,4.5,3+4,nan\n,,,,\nCase01, 71 ,,3+3, inf\nCase02,-2,1e1,,1_000\n"
    path = _table(tmp_path / "RUNMC" / CLINICAL_FILE, text, encoding="utf-8-sig")
    table = read_clinical_table(path, "RUNMC")
    assert table.columns == ("age", "psa", "gleason", "note")
    assert table.rows == {
        "Case00": {"age": 67, "psa": 4.5, "gleason": "3+4", "note": "nan"},
        "Case01": {"age": 71, "gleason": "3+3", "note": "inf"},
        "Case02": {"age": -2, "psa": 10.0, "note": "1_000"},
    }
    assert type(table.rows["Case00"]["age"]) is int and type(table.rows["Case02"]["psa"]) is float


@pytest.mark.parametrize("layout", ["saml", "fedfms"])
def test_site_folders_hold_their_tables(tmp_path: Path, layout: str) -> None:
    _table(tmp_path / "A" / CLINICAL_FILE, "case,age\nCase00,50\nCase01,\n")
    _table(tmp_path / "B" / CLINICAL_FILE, "site,case,age\nB,Case00,70\n")  # a site column naming its own site is fine
    _table(tmp_path / "Z" / CLINICAL_FILE, "no case column at all\n")  # a site not asked for is not read
    (tmp_path / "C").mkdir()  # no table: no clinical attributes
    attributes = read_clinical(tmp_path, layout, ["A", "B", "C"])
    assert attributes == {("A", "Case00"): {"age": 50}, ("A", "Case01"): {}, ("B", "Case00"): {"age": 70}}
    assert clinical_table_path(tmp_path, layout, "A") == tmp_path / "A" / CLINICAL_FILE


def test_msd_table_sits_beside_dataset_json(tmp_path: Path) -> None:
    _table(tmp_path / CLINICAL_FILE, "case,age\nprostate_00,58\n")
    assert read_clinical(tmp_path, "msd", ["Prostate"], msd_site="Prostate") == {("Prostate", "prostate_00"): {"age": 58}}
    assert clinical_table_path(tmp_path, "msd", "Prostate", msd_site="Prostate") == tmp_path / CLINICAL_FILE
    assert clinical_table_path(tmp_path, "msd", "Other", msd_site="Prostate") is None
    assert read_clinical(tmp_path / "missing", "saml", ["A"]) == {}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"\n", "has no 'case' column"),
        (b"patient,age\nCase00,60\n", "has no 'case' column (header: patient, age)"),
        (b"case,age\nCase00,60\nCase01,61\nCase00,62\n", "case 'Case00' appears twice, on lines 2 and 4"),
        (b"case,age,age\nCase00,60,61\n", "column(s) 'age' appear more than once"),
        (b"case,,age\nCase00,x,60\n", "column 2 of the header has no name"),
        (b"case,age\nCase00,60,extra\n", "line 2 has 3 cells but the header has 2 columns"),
        (b"case,age\n,60\n", "line 2 has no case"),
        (b"site,case,age\nBMC,Case00,60\n", "line 2 names site 'BMC', but this is the table of site 'RUNMC'"),
        (b"case,age\n\xff\xfeCase00,60\n", "cannot be read as a CSV table (UnicodeDecodeError"),
        (b'case,age\n"Case00,60\n', "cannot be read as a CSV table (Error"),
    ],
)
def test_bad_tables_name_the_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "RUNMC" / CLINICAL_FILE
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: {problem}")) as err:
        read_clinical(tmp_path, "saml", ["RUNMC"])
    assert err.value.path == str(path)


def test_reserved_columns_are_refused(tmp_path: Path) -> None:
    path = _table(tmp_path / "A" / CLINICAL_FILE, "case,age,gland_volume_ml\nCase00,60,30\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: column(s) 'gland_volume_ml' clash with attributes computed")):
        read_clinical(tmp_path, "saml", ["A"], reserved=("shape", "gland_volume_ml"))
    assert read_clinical(tmp_path, "saml", ["A"]) == {("A", "Case00"): {"age": 60, "gland_volume_ml": 30}}
