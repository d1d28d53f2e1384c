"""Tiny SAM parts in the official key layout, for checkpoint tests."""

import pytest
from segment_anything.modeling import MaskDecoder, Sam

from fedfms.models.sam import build_image_encoder, build_prompt_encoder, build_two_way_transformer, sam_size


def official_sam(size: str = "tiny", image_size: int = 64) -> Sam:
    """segment_anything's own Sam, built at a small size: its state dict has the official layout."""
    arch = sam_size(size)
    decoder = MaskDecoder(transformer_dim=arch.prompt_dim, transformer=build_two_way_transformer(arch), num_multimask_outputs=3)
    return Sam(build_image_encoder(arch, image_size), build_prompt_encoder(arch, image_size), decoder)


@pytest.fixture
def tiny_official_state():
    return official_sam().state_dict()
