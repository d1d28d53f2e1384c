"""The bundle defines its preprocessing: ``fedfms prepare --bundle`` runs its chain, training refuses another."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedfms.bundle import bundle_parser
from fedfms.cli import main
from fedfms.data.prepare import bundle_preparation
from fedfms.data.synthetic import synthesize_prostate
from fedfms.errors import DataError

REPO = Path(__file__).resolve().parents[2]
FLAPSAM = str(REPO / "bundles" / "flapsam_prostate")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    synthesize_prostate(root, sites=["RUNMC", "BMC"], cases_per_site=3, seed=1, shape=(24, 24, 8))
    return root


def _samples(data: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(data)): np.load(p) for p in sorted((data / "images").rglob("*.npy")) + sorted((data / "labels").rglob("*.npy"))}


def test_bundle_options_are_its_methods_paper_settings():
    assert bundle_preparation(FLAPSAM) == {
        "axcodes": "RAS", "lower_percentile": 0.0, "upper_percentile": 99.0, "zscore": False, "num_slices": 5,
        "all_label_slices": True, "image_size": 224, "label_size": 224, "multi_class": False, "num_classes": None, "keep_empty": True,
    }
    assert bundle_preparation(REPO / "bundles" / "fedmsa_prostate")["label_size"] == 256  # SAM's 4x smaller mask


def test_prepare_through_the_bundle_equals_prepare_with_the_same_flags(raw, tmp_path, capsys):
    size = ["--image-size", "32", "--label-size", "32"]
    assert main(["prepare", "--bundle", FLAPSAM, "--src", str(raw), "--out", str(tmp_path / "bundle"), *size]) == 0
    assert "overridden: image_size=32, label_size=32" in capsys.readouterr().out
    flags = ["--num-slices", "5", "--all-label-slices"]
    assert main(["prepare", "--src", str(raw), "--out", str(tmp_path / "flags"), *flags, *size]) == 0
    by_bundle, by_flags = _samples(tmp_path / "bundle"), _samples(tmp_path / "flags")
    assert by_bundle.keys() == by_flags.keys() and len(by_bundle) > 0
    for name, array in by_bundle.items():
        np.testing.assert_array_equal(array, by_flags[name])
    assert by_bundle["images/RUNMC/Case00_000.npy"].shape == (5, 24, 24)  # compact: 24 x 24 slices, resized to 32 on load
    recorded = json.loads((tmp_path / "bundle" / "prepare.json").read_text())["options"]
    assert recorded["bundle"] == FLAPSAM and recorded["overrides"] == ["image_size", "label_size"]
    for name in ("datalists/RUNMC.json", "datalists/BMC.json"):
        assert (tmp_path / "bundle" / name).read_text() == (tmp_path / "flags" / name).read_text()


def test_training_refuses_data_prepared_with_another_chain(raw, tmp_path):
    assert main(["prepare", "--src", str(raw), "--out", str(tmp_path / "single"), "--image-size", "32", "--label-size", "32"]) == 0
    parser = bundle_parser(FLAPSAM, ["train.json", "cpu_demo.json"], dataset_dir=str(tmp_path / "single"))
    record = tmp_path / "single" / "prepare.json"
    with pytest.raises(RuntimeError) as failed:  # MONAI's config expression wraps the error
        parser.get_parsed_content("train#dataset#data")
    assert isinstance(failed.value.__cause__, DataError)
    assert f"{record}: data prepared with num_slices=1 but the bundle's preprocessing_3d expects 5" in str(failed.value.__cause__)
    # The same data suits a single-slice bundle, whatever its storage size.
    fedmsa = bundle_parser(REPO / "bundles" / "fedmsa_prostate", ["train.json", "cpu_demo.json"], dataset_dir=str(tmp_path / "single"))
    assert len(fedmsa.get_parsed_content("train#dataset#data")) > 0
