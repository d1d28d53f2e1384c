"""SAM-Med2D: the published parameter count, official key layout, and checkpoint round trips."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import Sam

from fedfms.models.checkpoints import load_checkpoint
from fedfms.models.sam_med2d import build_prompt_sam, build_sam_med2d

TINY = 64  # tiny size: 4x4 token grid, the adapter's stride-2 conv gives 2x2
ADAPTER_SHAPES = {  # vit_b (D = 768), as in the official checkpoint
    "Adapter.norm.weight": (768,),
    "Adapter.norm.bias": (768,),
    "Adapter.channel.0.weight": (192, 768),
    "Adapter.channel.2.weight": (768, 192),
    "Adapter.spatial.0.weight": (768, 768, 3, 3),
    "Adapter.spatial.2.weight": (768, 768, 4, 4),  # ConvTranspose2d: (in, out, k, k)
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def adapter_keys(model: torch.nn.Module) -> list[str]:
    return sorted(k for k in model.state_dict() if ".Adapter." in k)


def tiny(seed: int, adapters: bool = True) -> Sam:
    torch.manual_seed(seed)
    return build_prompt_sam("tiny", TINY, adapters=adapters).eval()


@torch.no_grad()
def run(model: Sam, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    embedding = model.image_encoder(image)
    sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
    masks, _ = model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)
    return masks


def test_vit_b_has_the_published_271_2m_parameters():
    with torch.device("meta"):  # counts without allocating or initialising 271M weights
        med2d = build_sam_med2d("vit_b")
        sam_1024 = build_prompt_sam("vit_b", 1024)
    assert count(med2d) == 271_241_776  # SAM-Med2D reports 271.2M
    assert count(sam_1024) == 93_735_472  # official SAM ViT-B
    assert count(med2d.image_encoder.blocks[0].Adapter) == 15_042_048
    assert med2d.image_encoder.img_size == 256
    assert med2d.mask_decoder.num_multimask_outputs == 3


def test_adapter_keys_follow_the_official_layout():
    with torch.device("meta"):
        state = build_sam_med2d("vit_b").state_dict()
    for block in range(12):
        for name, shape in ADAPTER_SHAPES.items():
            assert tuple(state[f"image_encoder.blocks.{block}.{name}"].shape) == shape
        assert f"image_encoder.blocks.{block}.norm1.weight" in state  # base keys unchanged
        assert f"image_encoder.blocks.{block}.mlp.lin1.weight" in state
    assert len([k for k in state if ".Adapter." in k]) == 12 * len(ADAPTER_SHAPES)


def test_adapters_change_the_encoder_output():
    plain, med2d = tiny(0, adapters=False), tiny(0)
    med2d.load_state_dict(plain.state_dict(), strict=False)  # same base weights
    image = torch.randn(1, 3, TINY, TINY)
    with torch.no_grad():
        assert not torch.allclose(plain.image_encoder(image), med2d.image_encoder(image))


@pytest.mark.parametrize("wrapped", [True, False])
def test_checkpoint_round_trip_reproduces_outputs(tmp_path, wrapped):
    source, fresh = tiny(0), tiny(1)
    state = source.state_dict()
    path = tmp_path / "sam_med2d.pth"
    torch.save({"model": state} if wrapped else state, path)
    image, box = torch.randn(2, 3, TINY, TINY), torch.tensor([[8.0, 10.0, 40.0, 50.0]])
    assert not torch.allclose(run(source, image[:1], box), run(fresh, image[:1], box))
    report = load_checkpoint(fresh, path)
    assert sorted(report.loaded) == sorted(state) and not (report.initialised or report.unexpected or report.interpolated)
    for i in range(2):
        torch.testing.assert_close(run(fresh, image[i : i + 1], box), run(source, image[i : i + 1], box), rtol=0, atol=0)


def test_plain_sam_checkpoint_leaves_the_adapters_initialised(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save(tiny(0, adapters=False).state_dict(), path)
    model = tiny(1)
    report = load_checkpoint(model, path)
    assert sorted(report.initialised) == adapter_keys(model)
    assert not report.unexpected


def test_sam_med2d_checkpoint_in_plain_sam_reports_adapters_unexpected(tmp_path):
    source = tiny(0)
    path = tmp_path / "sam_med2d.pth"
    torch.save({"model": source.state_dict()}, path)
    plain = tiny(1, adapters=False)
    assert isinstance(plain, Sam)  # segment_anything's own class
    report = load_checkpoint(plain, path)
    assert report.unexpected == adapter_keys(source)
    assert not report.initialised


def test_odd_token_grid_is_rejected():
    with pytest.raises(ValueError, match="even"):
        build_sam_med2d("tiny", 48)  # 48 / 16 = 3 tokens
