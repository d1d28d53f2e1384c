"""Every bundle stands alone in model-zoo shape and agrees with the shared source it is rendered from."""

import json
import shutil
from pathlib import Path

import pytest

from fedfms.bundle_files import find_bundles, render_bundle, stale_files, write_bundle
from fedfms.cli import main

REPO = Path(__file__).resolve().parents[1]
BUNDLES = find_bundles(REPO / "bundles")
ZOO_METADATA_KEYS = (  # the keys MONAI's model-zoo metadata schema requires
    "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
    "name", "task", "description", "authors", "copyright", "network_data_format",
)


def test_every_bundle_is_found():
    assert [b.name for b in BUNDLES] == ["dynunet_prostate", "fedmsa_prostate", "fedsam_prostate", "flapsam_prostate", "smlite_prostate", "unet_prostate"]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_bundle_agrees_with_its_source_and_has_no_links(bundle):
    assert stale_files(bundle) == []
    assert not [p for p in bundle.rglob("*") if p.is_symlink()]
    for name in ("configs/train.json", "configs/evaluate.json", "configs/inference.json"):
        assert "network_def" in json.loads((bundle / name).read_text())  # each complete config builds the network
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert [key for key in ZOO_METADATA_KEYS if key not in metadata] == []
    assert metadata["version"] in metadata["changelog"]
    readme = (bundle / "docs" / "README.md").read_text()
    assert readme.startswith("# Model Overview") and "## MONAI Bundle Commands" in readme and "# License" in readme
    assert (bundle / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_an_edited_or_linked_file_is_stale_and_rewritten(tmp_path, capsys):
    bundle = tmp_path / "unet_prostate"
    shutil.copytree(REPO / "bundles" / "unet_prostate", bundle, ignore=shutil.ignore_patterns("models", "eval"))
    (bundle / "configs" / "evaluate.json").write_text("{}")
    (bundle / "LICENSE").unlink()
    (bundle / "LICENSE").symlink_to(REPO / "LICENSE")
    assert main(["bundles", "--root", str(tmp_path), "--check"]) == 2
    assert "LICENSE, configs/evaluate.json (out of date)" in capsys.readouterr().out
    assert write_bundle(bundle) == ["LICENSE", "configs/evaluate.json"]
    assert stale_files(bundle) == [] and not (bundle / "LICENSE").is_symlink()
    assert (bundle / "configs" / "evaluate.json").read_text() == render_bundle(bundle)["configs/evaluate.json"]


def test_a_folder_without_the_bundle_own_files_is_refused(tmp_path):
    with pytest.raises(Exception, match="not a fedfms bundle: configs/method.json, configs/metadata.json, docs/overview.md missing"):
        render_bundle(tmp_path)
