"""Loading official and project checkpoint layouts into every variant, from local files."""

import pytest
import torch

from fedfms.cli import main
from fedfms.errors import DataError
from fedfms.models import build_model, load_checkpoint, read_state_dict
from fedfms.models.strategies import STRATEGIES
from tests.models.conftest import official_sam


def _save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("model_name", ["sam", "flapsam"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_official_sam_loads_into_every_variant(tmp_path, tiny_official_state, model_name, strategy):
    path = _save(tmp_path, tiny_official_state)
    model = build_model(model_name, strategy, "tiny", 64)
    report = load_checkpoint(model, path)
    state = model.state_dict()
    for key in report.loaded:
        assert torch.equal(state[key], tiny_official_state[key])
    assert "image_encoder.patch_embed.proj.weight" in report.loaded
    assert report.interpolated == []
    if model_name == "sam":  # same decoder as SAM: every checkpoint key is used
        assert report.unexpected == []
    new = [k for k in state if k not in tiny_official_state]
    assert set(new) <= set(report.initialised)
    if STRATEGIES[strategy].needs == "lora":
        assert any(".lora_b" in k for k in report.initialised)
    if model_name == "flapsam":  # its added upscaling convs and narrower hypernetworks start fresh
        assert "mask_decoder.output_upscaling.9.weight" in report.initialised
        assert "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight" in report.initialised
        assert "mask_decoder.output_upscaling.0.weight" in report.loaded  # SAM's first conv is kept
        assert "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight" in report.unexpected


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix"])
def test_wrappers_and_prefixes(tmp_path, tiny_official_state, wrap):
    obj = {
        "plain": tiny_official_state,
        "model": {"model": tiny_official_state, "epoch": 3},
        "state_dict": {"state_dict": tiny_official_state},
        "module_prefix": {f"module.{k}": v for k, v in tiny_official_state.items()},
    }[wrap]
    assert read_state_dict(_save(tmp_path, obj)).keys() == tiny_official_state.keys()


def test_checkpoint_from_another_image_size_is_interpolated(tmp_path):
    state = official_sam("tiny", image_size=64).state_dict()  # 4x4 tokens
    model = build_model("sam", "full", "tiny", 128)  # 8x8 tokens
    report = load_checkpoint(model, _save(tmp_path, state))
    assert "image_encoder.pos_embed" in report.interpolated
    assert model.image_encoder.pos_embed.shape == (1, 8, 8, 64)
    # tiny: block 1 attends globally (its tables grow with the image), block 0 uses 4x4 windows.
    assert "image_encoder.blocks.1.attn.rel_pos_h" in report.interpolated
    assert "image_encoder.blocks.0.attn.rel_pos_h" in report.loaded
    assert model.image_encoder.blocks[1].attn.rel_pos_h.shape == (15, 32)
    # A constant table stays constant; a linear ramp stays a ramp with the same ends.
    ramp = torch.linspace(-1, 1, 7)[:, None].repeat(1, 32)
    state["image_encoder.blocks.1.attn.rel_pos_w"] = ramp
    load_checkpoint(model, state)
    table = model.image_encoder.blocks[1].attn.rel_pos_w
    assert torch.all(table[1:, 0] >= table[:-1, 0]) and table[0, 0] < -0.8 and table[-1, 0] > 0.8
    assert model(torch.rand(1, 1, 128, 128)).shape == (1, 1, 32, 32)


def test_project_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    trained = build_model("flapsam", "flap", "tiny", 64).eval()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # as if trained
    path = _save(tmp_path, {"model": trained.state_dict()})
    fresh = build_model("flapsam", "flap", "tiny", 64, checkpoint=path).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x))
    report = load_checkpoint(fresh, path)
    assert report.initialised == [] and report.unexpected == []


def test_wrong_size_is_an_error_naming_the_file(tmp_path):
    path = _save(tmp_path, official_sam("small", 64).state_dict())
    with pytest.raises(DataError, match="does not fit this model") as info:
        load_checkpoint(build_model("sam", "full", "tiny", 64), path)
    assert str(path) in str(info.value) and "image_encoder.patch_embed.proj.weight: shape" in str(info.value)


def test_missing_base_weights_are_an_error(tmp_path, tiny_official_state):
    del tiny_official_state["image_encoder.neck.0.weight"]
    with pytest.raises(DataError, match="image_encoder.neck.0.weight: missing"):
        load_checkpoint(build_model("sam", "full", "tiny", 64), tiny_official_state)


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(DataError, match="checkpoint not found"):
        read_state_dict(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pth: cannot be read as a PyTorch checkpoint"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(DataError, match="holds no state dict"):
        read_state_dict(_save(tmp_path, {"epoch": 3}))


def test_params_command_shows_the_key_report(tmp_path, tiny_official_state, capsys):
    path = _save(tmp_path, tiny_official_state)
    args = ["params", "--model", "flapsam", "--strategy", "flap", "--size", "tiny", "--image-size", "64", "--checkpoint", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "initialised (new layers):" in out and "lora_b_q" in out and "unexpected (unused):" in out
    assert main(["params", "--model", "sam", "--size", "tiny", "--image-size", "64", "--checkpoint", str(tmp_path / "x.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
