"""The pre-stage on the proxy set: input checks that name the path, distillation and supervised pre-training."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import load_decathlon_datalist

from fedfms.bundle import bundle_parser
from fedfms.distillation import PrestageSettings, load_proxy, run_prestage
from fedfms.errors import DataError

REPO = Path(__file__).resolve().parents[2]
STUDENT = REPO / "bundles" / "smlite_prostate"


def _student(data):
    """The SM-lite bundle's CPU-demo network and sample transforms, as the server's pre-stage builds them."""
    parser = bundle_parser(STUDENT, ["train.json", "cpu_demo.json"], dataset_dir=str(data), datalist_dir="partitions/natural")
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("sample_transforms"), parser.get_parsed_content("label_size")


def _proxy(data) -> Path:
    return data / "partitions" / "natural" / "server_proxy.json"


def _write_proxy(path: Path, entries: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": entries}))
    return path


def test_bad_proxy_sets_are_named(proxy_data, tmp_path):
    with pytest.raises(DataError, match="server_proxy.json: no server proxy set"):
        load_proxy(tmp_path / "server_proxy.json")
    with pytest.raises(DataError, match="server proxy set is empty"):
        load_proxy(_write_proxy(tmp_path / "empty" / "server_proxy.json", []))
    absolute = load_decathlon_datalist(_proxy(proxy_data), data_list_key="training")
    missing = [{**absolute[0], "image": str(tmp_path / "gone.npy")}]
    with pytest.raises(DataError, match=r"gone.npy: listed in the server proxy set .* but missing"):
        load_proxy(_write_proxy(tmp_path / "missing" / "server_proxy.json", missing))
    empty_labels = []
    for i, entry in enumerate(absolute):
        label = np.zeros_like(np.load(entry["label"]))
        np.save(tmp_path / f"empty_{i}.npy", label)
        empty_labels.append({**entry, "label": str(tmp_path / f"empty_{i}.npy")})
    with pytest.raises(DataError, match=f"none of the {len(absolute)} proxy slices has foreground"):
        load_proxy(_write_proxy(tmp_path / "background" / "server_proxy.json", empty_labels))
    assert len(load_proxy(_proxy(proxy_data))) == len(absolute)


def test_fm_prestage_distils_a_copy_of_the_network(proxy_data, tiny_teacher, tmp_path):
    network, transforms, label_size = _student(proxy_data)
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    settings = PrestageSettings("fm", epochs=4, learning_rate=1e-3, batch_size=4)
    student, record = run_prestage(network, _proxy(proxy_data), transforms, label_size, settings, tiny_teacher, tmp_path / "cache", log=lambda _: None)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in initial.items())  # the given network is untouched
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in initial.items())
    assert record.mode == "fm" and record.teacher["cache_hit"] is False and Path(record.teacher["cache_file"]).is_file()
    assert 0 <= record.teacher["proxy_dice"] <= 1 and 0 <= record.student["proxy_dice"] <= 1
    losses = record.student["epoch_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert record.proxy["slices"] == len(load_proxy(_proxy(proxy_data))) and 0 < record.proxy["foreground_slices"] < record.proxy["slices"]


def test_pretrain_prestage_learns_the_proxy_labels_without_a_teacher(proxy_data, tmp_path):
    network, transforms, label_size = _student(proxy_data)
    settings = PrestageSettings("pretrain", epochs=15, learning_rate=3e-3, batch_size=4)
    _, record = run_prestage(network, _proxy(proxy_data), transforms, label_size, settings, None, tmp_path / "cache", log=lambda _: None)
    assert record.teacher is None and not (tmp_path / "cache").exists()
    assert record.student["proxy_dice"] > record.student["proxy_dice_before"] + 0.2


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown init mode"):
        PrestageSettings("warm")
    with pytest.raises(ValueError, match="alpha"):
        PrestageSettings("fm", alpha=-0.1)
    with pytest.raises(ValueError, match="no pre-stage"):
        run_prestage(torch.nn.Identity(), "x.json", [], 32, PrestageSettings("random"), None, "cache")


def test_prestage_trains_the_unet_baseline_as_student(proxy_data, tiny_teacher, tmp_path):
    """FedU-Net (batch norm) is a student as well as SM-lite: weights and running statistics both learn."""
    parser = bundle_parser(REPO / "bundles" / "unet_prostate", ["train.json", "cpu_demo.json"], dataset_dir=str(proxy_data))
    network = parser.get_parsed_content("network_def")
    settings = PrestageSettings("fm", epochs=2, learning_rate=1e-3, batch_size=4)
    student, record = run_prestage(
        network, _proxy(proxy_data), parser.get_parsed_content("sample_transforms"), parser.get_parsed_content("label_size"),
        settings, tiny_teacher, tmp_path / "cache", log=lambda _: None,
    )
    before, after = network.state_dict(), student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("conv.weight") for k in changed)
    assert len(record.student["epoch_loss"]) == 2
