"""A small prepared dataset with a server proxy set, and a tiny SAM teacher saved as a checkpoint."""

from pathlib import Path

import pytest
import torch

from fedfms.data.partition import PartitionOptions, partition
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate
from fedfms.distillation import TeacherSpec
from fedfms.models.sam_med2d import build_prompt_sam

TEACHER_SIZE = 64


@pytest.fixture(scope="session")
def proxy_data(tmp_path_factory) -> Path:
    """Two sites, four cases each, prepared at 32 px; half of each site's training cases are the server's proxy."""
    root = tmp_path_factory.mktemp("distillation")
    synthesize_prostate(root / "raw", sites=["RUNMC", "HK"], cases_per_site=4, seed=2, shape=(32, 32, 8))
    prepare(root / "raw", root / "data", PrepareOptions(image_size=32, label_size=32), log=lambda _: None)
    partition(root / "data", root / "data" / "partitions" / "natural", PartitionOptions(method="natural", proxy_fraction=0.5))
    return root / "data"


def save_tiny_sam(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(build_prompt_sam("tiny", TEACHER_SIZE).state_dict(), path)
    return path


@pytest.fixture
def tiny_teacher(tmp_path) -> TeacherSpec:
    """A random tiny SAM (same classes as SAM ViT-B) with its weights in a local checkpoint file."""
    return TeacherSpec(kind="sam", size="tiny", image_size=TEACHER_SIZE, checkpoint=str(save_tiny_sam(tmp_path / "teacher.pth", 0)))
