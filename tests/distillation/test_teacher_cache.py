"""The teacher's logits are computed once per teacher and data, reused, and recomputed when either changes."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from monai.data import load_decathlon_datalist

from fedfms.distillation import TeacherSpec, teacher_logits
from fedfms.errors import DataError
from fedfms.models.teacher import EMPTY_LOGIT
from tests.distillation.conftest import save_tiny_sam


def _samples(data):
    return load_decathlon_datalist(data / "partitions" / "natural" / "server_proxy.json", data_list_key="training")


def _quiet(_):
    pass


def _forbid_teacher(monkeypatch):
    def refuse(self, output_size):
        raise AssertionError("the teacher ran although its logits were cached")

    monkeypatch.setattr(TeacherSpec, "build", refuse)


def test_logits_are_cached_and_reused(proxy_data, tiny_teacher, tmp_path, monkeypatch):
    samples = _samples(proxy_data)
    first = teacher_logits(samples, tiny_teacher, tmp_path / "cache", _quiet)
    assert not first.cache_hit and first.cache_file.is_file()
    assert first.logits.shape == (len(samples), 1, 32, 32) and 0 < sum(first.foreground) < len(samples)
    empty = [i for i, present in enumerate(first.foreground) if not present]
    assert (first.logits[empty] == EMPTY_LOGIT).all()  # empty slices get "no object" without running the teacher
    record = json.loads(first.cache_file.with_suffix(".json").read_text())
    assert record["checkpoint"] == tiny_teacher.checkpoint and "checkpoint" not in record["made_from"]["teacher"]
    assert len(record["made_from"]["samples"]) == len(samples) and len(record["sources"]) == len(samples)

    _forbid_teacher(monkeypatch)
    again = teacher_logits(samples, tiny_teacher, tmp_path / "cache", _quiet)
    assert again.cache_hit and again.cache_file == first.cache_file
    torch.testing.assert_close(again.logits, first.logits.half().float())  # stored as float16


def test_cache_follows_the_bytes_not_the_paths(proxy_data, tiny_teacher, tmp_path, monkeypatch):
    """Data and weights moved elsewhere (another data folder, a reinstall's new checkpoint path) still hit the cache."""
    first = teacher_logits(_samples(proxy_data), tiny_teacher, tmp_path / "cache", _quiet)
    moved = tmp_path / "moved"
    shutil.copytree(proxy_data, moved)
    reinstalled = tmp_path / "other_env" / "teacher.pth"
    reinstalled.parent.mkdir()
    shutil.copy(tiny_teacher.checkpoint, reinstalled)
    _forbid_teacher(monkeypatch)
    again = teacher_logits(_samples(moved), replace(tiny_teacher, checkpoint=str(reinstalled)), tmp_path / "cache", _quiet)
    assert again.cache_hit and again.cache_file == first.cache_file


@pytest.mark.parametrize("change", ["checkpoint", "box_jitter", "precision", "label", "fewer samples"])
def test_cache_is_invalidated_by_any_change(change, proxy_data, tiny_teacher, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(proxy_data, data)
    samples, teacher = _samples(data), tiny_teacher
    first = teacher_logits(samples, teacher, tmp_path / "cache", _quiet)
    if change == "checkpoint":  # same path, other weights
        save_tiny_sam(tmp_path / "teacher.pth", seed=1)
    elif change == "box_jitter":
        teacher = replace(teacher, box_jitter=0.1)
    elif change == "precision":  # bf16 logits are never taken for float32 ones, nor the reverse
        teacher = replace(teacher, precision="bfloat16" if teacher.resolved_precision() == "float32" else "float32")
    elif change == "label":
        index = first.foreground.index(True)
        label = np.load(samples[index]["label"])
        label[:] = 0
        label[0, 4:8, 4:8] = 1
        np.save(samples[index]["label"], label)
    else:
        samples = samples[1:]
    second = teacher_logits(samples, teacher, tmp_path / "cache", _quiet)
    assert not second.cache_hit and second.cache_file != first.cache_file
    assert first.cache_file.is_file() and second.cache_file.is_file()


def test_missing_teacher_checkpoint_is_named(proxy_data, tmp_path):
    spec = TeacherSpec(kind="sam", size="tiny", image_size=64, checkpoint=str(tmp_path / "nowhere.pth"))
    with pytest.raises(DataError, match="nowhere.pth: sam teacher checkpoint not found"):
        teacher_logits(_samples(proxy_data), spec, tmp_path / "cache", _quiet)
    with pytest.raises(ValueError, match="needs a local checkpoint path"):
        TeacherSpec(kind="sam_med2d")
    assert TeacherSpec().checkpoint_path().name == "lite_medsam.pth"  # LiteMedSAM's ships with its package


def test_an_unknown_teacher_precision_is_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown teacher precision 'half'; expected auto or one of float32, bfloat16"):
        TeacherSpec(precision="half")
