import pytest
import torch
from segment_anything import sam_model_registry

from fedfms.models import SamSegmenter, build_model, count_parameters
from fedfms.models.sam import SAM_SIZES


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size,total", [("vit_b", 93_735_472), ("vit_l", 312_342_832), ("vit_h", 641_090_608)])
def test_paper_sizes_match_official_sam(size, total):
    with torch.device("meta"):  # counts need no memory
        ours = SamSegmenter(size, 1024, num_classes=1)
        official = sam_model_registry[size]()
    assert _numel(ours) - _numel(ours.head) == _numel(official) == total
    assert {k for k in ours.state_dict() if not k.startswith("head.")} == set(official.state_dict())


def test_vit_b_component_counts():
    model = SamSegmenter("vit_b", 1024)
    assert (_numel(model.image_encoder), _numel(model.prompt_encoder), _numel(model.mask_decoder)) == (89_670_912, 6_220, 4_058_340)
    assert _numel(model.head) == 4 + 1  # 1x1 conv from the 4 mask-token maps to 1 class


def test_flap_decoder_counts_at_224():
    model = SamSegmenter("vit_b", 224, num_classes=1, decoder="flap")
    decoder = model.mask_decoder
    assert _numel(model) == 90_398_774
    assert _numel(decoder.output_upscaling) == 76_632
    assert _numel(decoder.output_hypernetworks_mlps) == 267_280
    assert decoder.mask_tokens.weight.numel() == 512 and decoder.num_mask_tokens == 2


@pytest.mark.parametrize("decoder,classes,channels,res", [("fedfms", 2, 2, 16), ("flap", 1, 2, 64), ("flap", 3, 4, 64)])
def test_output_shapes(decoder, classes, channels, res):
    model = SamSegmenter("tiny", 64, num_classes=classes, decoder=decoder)
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, channels, res, res)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, channels, res, res)
    assert model.out_channels == channels


def test_slices_mode_gives_one_prediction_per_slice():
    model = SamSegmenter("tiny", 64, decoder="flap", input_mode="slices")
    x = torch.rand(2, 5, 64, 64)
    out = model(x)
    assert out.shape == (10, 2, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[7:8], SamSegmenter.forward(model, x[1:2])[2:3])


def test_batched_decode_equals_one_image_at_a_time():
    model = SamSegmenter("tiny", 64).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model(x[i : i + 1]) for i in range(3)]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"size": "vit_x"}, "unknown SAM size 'vit_x'"),
        ({"image_size": 100}, "not divisible by the patch size 16"),
        ({"decoder": "unet"}, "unknown decoder"),
        ({"input_mode": "depth"}, "unknown input mode"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamSegmenter(**{"size": "tiny", "image_size": 64, **kwargs})


def test_bad_input_shapes():
    model = SamSegmenter("tiny", 64)
    with pytest.raises(ValueError, match="N-slice stacks need input_mode='slices'"):
        model(torch.rand(1, 5, 64, 64))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1 or 3, 64, 64\)"):
        model(torch.rand(1, 1, 32, 32))


def test_cpu_sizes_are_small():
    for size in ("tiny", "small"):
        assert count_parameters(build_model("sam", "full", size, 128)).total < 5_000_000
    assert set(SAM_SIZES) >= {"vit_b", "vit_l", "vit_h", "small", "tiny"}
