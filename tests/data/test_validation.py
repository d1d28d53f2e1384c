"""Bad input: every problem is named with its file, under --on-error stop and skip."""

from pathlib import Path

import numpy as np
import pytest

from fedfms.cli import EXIT_BAD_INPUT, EXIT_SKIPPED, main
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.errors import DataError
from tests.conftest import gland_case, write_nifti, write_saml

SMALL = dict(image_size=8, label_size=8, val_fraction=0, test_fraction=0)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not a NIfTI file at all" * 10)


def _image(raw: Path) -> Path:
    return raw / "A" / "Case01.nii.gz"


def _label(raw: Path) -> Path:
    return raw / "A" / "Case01_Segmentation.nii.gz"


def _rewrite_image(array_fn):
    return lambda raw: write_nifti(_image(raw), array_fn(gland_case()[0]))


def _rewrite_label(array_fn):
    return lambda raw: write_nifti(_label(raw), array_fn(gland_case()[1]))


def _with_nan(image):
    image[3, 3, 3] = np.nan
    return image


def _label_with(value):
    def change(label):
        label = label.astype(np.float32)
        label[0, 0, 0] = value
        return label
    return change


BAD_CASES = {
    "truncated image": (lambda raw: _truncate(_image(raw)), _image, "corrupt or truncated"),
    "corrupt label": (lambda raw: _not_gzip(_label(raw)), _label, "corrupt or truncated"),
    "missing label": (lambda raw: _label(raw).unlink(), _image, "no label file found"),
    "shape mismatch": (_rewrite_label(lambda l: l[:, :, :6]), _label, r"label shape \(20, 18, 6\) does not match image shape \(20, 18, 8\)"),
    "2D image": (_rewrite_image(lambda i: i[:, :, 0]), _image, "is 2D .* expected a 3D volume"),
    "4D image": (_rewrite_image(lambda i: np.stack([i, i], -1)), _image, "is 4D .* expected a 3D volume"),
    "NaN voxels": (_rewrite_image(_with_nan), _image, r"1 non-finite voxels \(1 NaN"),
    "negative label": (_rewrite_label(_label_with(-1)), _label, "label values out of range: found -1..1"),
    "fractional label": (_rewrite_label(_label_with(0.5)), _label, "non-integer"),
    "label above 255": (_rewrite_label(_label_with(1000)), _label, "found 0..1000, a binary mask allows 0..255"),
}


@pytest.fixture
def raw(tmp_path):
    return write_saml(tmp_path / "raw", sites=("A",), cases=3)


@pytest.mark.parametrize("problem", list(BAD_CASES))
def test_stop_names_file_and_problem(raw, tmp_path, problem):
    damage, culprit, message = BAD_CASES[problem]
    damage(raw)
    with pytest.raises(DataError, match=message) as info:
        prepare(raw, tmp_path / "data", PrepareOptions(**SMALL), log=lambda _: None)
    assert info.value.path == str(culprit(raw))
    assert not (tmp_path / "data" / "datalists").exists()  # nothing half-done is published


@pytest.mark.parametrize("problem", list(BAD_CASES))
def test_skip_goes_on_and_lists_the_file(raw, tmp_path, problem):
    damage, culprit, message = BAD_CASES[problem]
    damage(raw)
    result = prepare(raw, tmp_path / "data", PrepareOptions(on_error="skip", **SMALL), log=lambda _: None)
    assert sorted(c["case"] for c in result.cases) == ["Case00", "Case02"]
    assert len(result.skipped) == 1 and result.skipped[0]["file"] == str(culprit(raw))


def test_multi_class_label_beyond_num_classes(raw, tmp_path):
    _rewrite_label(_label_with(3))(raw)
    with pytest.raises(DataError, match="found 0..3, a 3-class label allows 0..2"):
        prepare(raw, tmp_path / "data", PrepareOptions(multi_class=True, num_classes=3, **SMALL), log=lambda _: None)


def test_cli_exit_codes_and_summary(raw, tmp_path, capsys):
    _truncate(_image(raw))
    args = ["prepare", "--src", str(raw), "--out", str(tmp_path / "data"), "--image-size", "8", "--label-size", "8"]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(_image(raw)) in err and "corrupt or truncated" in err
    assert main(args + ["--on-error", "skip"]) == EXIT_SKIPPED
    out = capsys.readouterr().out
    assert "skipped 1 file(s):" in out and f"{_image(raw)}: cannot be read" in out
    write_nifti(_image(raw), gland_case()[0])
    assert main(args + ["--on-error", "skip"]) == 0


def test_missing_source_folder(tmp_path, capsys):
    assert main(["prepare", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")]) == EXIT_BAD_INPUT
    assert f"{tmp_path / 'nowhere'}: source folder not found" in capsys.readouterr().err
