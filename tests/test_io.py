import numpy as np
import pytest

from fedfms.errors import DataError
from fedfms.io import atomic_write, load_json, load_volume, save_json, save_npy, strip_volume_suffix
from tests.conftest import write_nifti


def test_load_volume_keeps_geometry(tmp_path):
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = write_nifti(tmp_path / "v.nii.gz", array)
    volume = load_volume(path)
    assert volume.shape == (2, 3, 4) and volume.dtype.is_floating_point
    np.testing.assert_array_equal(volume.numpy(), array)
    np.testing.assert_allclose(volume.pixdim[:3].numpy(), [0.8, 0.8, 3.0])


def test_load_volume_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(DataError, match="x.png: unknown volume format"):
        load_volume(tmp_path / "x.png")


def test_strip_volume_suffix():
    assert strip_volume_suffix("a/Case00_segmentation.nii.gz") == "Case00_segmentation"
    assert strip_volume_suffix("b.mha") == "b" and strip_volume_suffix("c.NRRD") == "c"


def test_atomic_write_keeps_old_content_when_writing_fails(tmp_path):
    target = tmp_path / "out.json"
    save_json(target, {"a": 1})

    def failing(tmp):
        tmp.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert load_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_save_npy_roundtrip_and_bad_json(tmp_path):
    save_npy(tmp_path / "a" / "x.npy", np.ones((2, 2), np.uint8))
    assert np.load(tmp_path / "a" / "x.npy").sum() == 4
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json: is not valid JSON"):
        load_json(tmp_path / "bad.json")
