"""Trainable sets: exact paper counts, each set equals its rule, gradients only where they may go."""

import pytest
import torch

from fedfms.cli import main
from fedfms.models import STRATEGIES, build_model, count_parameters, trainable_names
from fedfms.models.peft import LoRALinear, LoRAQKV
from fedfms.models.strategies import is_attention, is_decoder, is_decoder_output, is_lora


@pytest.fixture(scope="module")
def flap_vit_b():
    return {s: build_model("flapsam", s, "vit_b", 224, num_classes=1) for s in ("flap", "lora", "lora_dec", "dec", "pdec", "attn", "full")}


@pytest.mark.parametrize(
    "strategy,trainable,total",
    [
        ("flap", 1_712_488, 91_766_838),
        ("lora", 1_368_064, 91_766_838),
        ("lora_dec", 5_136_106, 91_766_838),  # Table 1: 5.136M / 91.767M
        ("dec", 3_768_042, 90_398_774),  # 3.768M / 90.399M
        ("pdec", 344_424, 90_398_774),  # 0.344M
        ("attn", 29_574_784, 90_398_774),  # 29.575M
        ("full", 90_398_774, 90_398_774),
    ],
)
def test_flap_sam_table_1_counts(flap_vit_b, strategy, trainable, total):
    count = count_parameters(flap_vit_b[strategy])
    assert (count.trainable, count.total) == (trainable, total)
    assert count.bytes_per_round == 4 * trainable


def test_lora_counts_by_part(flap_vit_b):
    named = dict(flap_vit_b["lora"].named_parameters())
    encoder = sum(p.numel() for n, p in named.items() if is_lora(n) and n.startswith("image_encoder."))
    decoder = sum(p.numel() for n, p in named.items() if is_lora(n) and n.startswith("mask_decoder."))
    assert (encoder, decoder) == (1_179_648, 188_416)
    assert sum(isinstance(m, LoRALinear) for m in flap_vit_b["lora"].modules()) == 14  # q and v of 7 decoder attentions
    assert sum(isinstance(m, LoRAQKV) for m in flap_vit_b["lora"].modules()) == 12


def test_flap_sam_two_classes():
    assert count_parameters(build_model("flapsam", "flap", "vit_b", 224, num_classes=2)).trainable == 1_846_384


@pytest.mark.parametrize("depth,adapters", [(False, 7_100_928), (True, 10_651_392)])
def test_fedmsa_counts(depth, adapters):
    model = build_model("sam", "msa", "vit_b", 1024, num_classes=1, depth_adapter=depth)
    named = dict(model.named_parameters())
    assert sum(p.numel() for n, p in named.items() if "_Adapter." in n) == adapters
    assert sum(p.numel() for n, p in named.items() if is_decoder(n)) == 4_058_340
    assert count_parameters(model).trainable == adapters + 4_058_340 + 5  # + the 1x1 head
    # FedFMS Table 2: 14.7M learnable with all three adapters.
    assert round(count_parameters(model).trainable / 1e6, 1) == (14.7 if depth else 11.2)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model_name", ["sam", "flapsam"])
def test_trainable_set_is_the_rule_and_only_it_gets_gradients(model_name, strategy):
    torch.manual_seed(0)
    model = build_model(model_name, strategy, "tiny", 64, num_classes=1, lora_init="default")
    rule = STRATEGIES[strategy]
    expected = {n for n, _ in model.named_parameters() if rule.trains(n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected == set(trainable_names(model, strategy))
    model(torch.rand(2, 1, 64, 64)).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= expected
    characteristic = {
        "full": lambda n: n.startswith("image_encoder.patch_embed"),
        "msa": lambda n: "Space_Adapter" in n,
        "flap": is_lora,
        "lora": is_lora,
        "lora_dec": lambda n: is_lora(n) or is_decoder(n),
        "dec": is_decoder,
        "pdec": is_decoder_output,
        "attn": is_attention,
    }[strategy]
    assert any(characteristic(n) for n in with_grad)


def test_frozen_encoder_builds_no_graph():
    x = torch.rand(1, 3, 64, 64)
    assert not build_model("sam", "dec", "tiny", 64).encode(x).requires_grad
    assert build_model("sam", "full", "tiny", 64).encode(x).requires_grad
    assert build_model("sam", "lora", "tiny", 64).encode(x).requires_grad


def test_zero_b_lora_starts_as_the_base_model():
    torch.manual_seed(0)
    base = build_model("flapsam", "full", "tiny", 64).eval()
    lora = build_model("flapsam", "flap", "tiny", 64, checkpoint=base.state_dict()).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), base(x))


def test_depth_adapter_mixes_the_slices_of_a_stack():
    model = build_model("sam", "msa", "tiny", 64, input_mode="slices", num_slices=3, depth_adapter=True)
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    assert model.image_encoder.blocks[0].Depth_Adapter.D_fc1.weight.grad.abs().sum() > 0


def test_bad_strategy_and_unet_strategy():
    with pytest.raises(ValueError, match="unknown strategy 'half'"):
        build_model("sam", "half", "tiny", 64)
    with pytest.raises(ValueError, match="use strategy 'full'"):
        build_model("unet", "lora", image_size=64)
    with pytest.raises(ValueError, match="unknown model 'vnet'"):
        build_model("vnet")
    with pytest.raises(ValueError, match="LoRA rank must be at least 1"):
        build_model("flapsam", "flap", "tiny", 64, lora_rank=0)


def test_params_command_prints_counts(capsys):
    assert main(["params", "--model", "flapsam", "--strategy", "flap", "--size", "vit_b", "--image-size", "224", "--num-classes", "1"]) == 0
    out = capsys.readouterr().out
    assert "91,766,838" in out and "1,712,488" in out and "6,849,952" in out
    assert main(["params", "--model", "sam", "--strategy", "pdec", "--size", "tiny", "--image-size", "64", "--list"]) == 0
    listed = capsys.readouterr().out.split("trainable:\n")[1].split()
    assert listed and all(n.startswith(("mask_decoder.output", "mask_decoder.mask_tokens", "head.")) for n in listed)
