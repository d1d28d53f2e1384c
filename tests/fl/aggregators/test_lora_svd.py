"""LoRA SVD aggregation (FLAP-SAM): exactness, measured truncation, FedAvg of the rest, NVFlare aggregator."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedfms.fl.aggregators.lora_svd import LoRASVDAggregator, aggregate_lora, lora_pairs, refactorize
from fedfms.models import build_model

ENC = "image_encoder.blocks.0.attn.qkv"
DEC = "mask_decoder.transformer.layers.0.self_attn.q_proj"


def low_rank(out: int, inp: int, rank: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A random LoRA pair: A (rank, in), B (out, rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g, dtype=dtype), torch.randn(out, rank, generator=g, dtype=dtype)


def client(seed: int, rank: int = 2, out: int = 6, inp: int = 5, bias: float = 0.0) -> dict[str, torch.Tensor]:
    a, b = low_rank(out, inp, rank, seed)
    return {f"{DEC}.lora_a.weight": a, f"{DEC}.lora_b.weight": b, "head.bias": torch.full((3,), bias, dtype=torch.float64)}


def product(params: dict, layer: str = DEC) -> torch.Tensor:
    return params[f"{layer}.lora_b.weight"] @ params[f"{layer}.lora_a.weight"]


def test_lora_pairs_groups_both_naming_schemes():
    keys = [f"{ENC}.lora_a_q.weight", f"{ENC}.lora_b_q.weight", f"{ENC}.lora_a_v.weight", f"{ENC}.lora_b_v.weight",
            f"{DEC}.lora_a.weight", f"{DEC}.lora_b.weight", f"{ENC}.weight", "head.bias"]
    assert lora_pairs(keys) == {
        f"{ENC}.lora_q": (f"{ENC}.lora_a_q.weight", f"{ENC}.lora_b_q.weight"),
        f"{ENC}.lora_v": (f"{ENC}.lora_a_v.weight", f"{ENC}.lora_b_v.weight"),
        f"{DEC}.lora": (f"{DEC}.lora_a.weight", f"{DEC}.lora_b.weight"),
    }


@pytest.mark.parametrize("lone", [f"{ENC}.lora_b_v.weight", f"{DEC}.lora_a.weight"])
def test_lora_pairs_names_a_key_without_partner(lone):
    with pytest.raises(ValueError, match=lone.replace(".", r"\.")):
        lora_pairs([f"{ENC}.lora_a_q.weight", f"{ENC}.lora_b_q.weight", lone])


def test_refactorize_is_exact_within_rank_and_splits_singular_values():
    a0, b0 = low_rank(8, 7, 3, seed=0)
    m = b0 @ a0
    a, b, error = refactorize(m, 4)  # rank(M) = 3 <= 4
    assert a.shape == (4, 7) and b.shape == (8, 4) and a.dtype == b.dtype == torch.float64
    assert error < 1e-12
    torch.testing.assert_close(b @ a, m, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)  # orthonormal columns
    s = torch.linalg.svdvals(m)
    torch.testing.assert_close(torch.linalg.vector_norm(a, dim=1)[:3], s[:3])  # A's rows carry the singular values


def test_refactorize_keeps_dtype_pads_beyond_full_rank_and_handles_zero():
    m = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    a, b, error = refactorize(m, 4)  # min(out, in) = 3 < 4: zero-padded, still exact
    assert a.dtype == b.dtype == torch.float32 and a.shape == (4, 5) and b.shape == (3, 4)
    assert error < 1e-12 and not a[3].any() and not b[:, 3].any()
    torch.testing.assert_close(b @ a, m)
    a, b, error = refactorize(torch.zeros(4, 6), 2)
    assert error == 0.0 and not a.any()
    with pytest.raises(ValueError):
        refactorize(m, 0)


def test_aggregate_within_rank_is_the_exact_weighted_product_average():
    c1, c2 = client(1, rank=2), client(2, rank=2)
    params, errors = aggregate_lora([(c1, 30), (c2, 10)], rank=4)  # combined rank 4 <= 4
    expected = 0.75 * product(c1) + 0.25 * product(c2)
    assert params[f"{DEC}.lora_a.weight"].shape == (4, 5)
    torch.testing.assert_close(product(params), expected, rtol=0, atol=1e-12)
    assert errors[f"{DEC}.lora"] < 1e-12


def test_aggregate_beyond_rank_reports_the_discarded_energy():
    c1, c2 = client(1, rank=2), client(2, rank=2)
    params, errors = aggregate_lora([(c1, 30), (c2, 10)])  # default rank 2 < combined rank 4
    m = 0.75 * product(c1) + 0.25 * product(c2)
    s = torch.linalg.svdvals(m)
    expected = float(torch.sqrt((s[2:] ** 2).sum()) / torch.linalg.matrix_norm(m))
    assert params[f"{DEC}.lora_a.weight"].shape == (2, 5)
    assert expected > 0.01
    assert errors[f"{DEC}.lora"] == pytest.approx(expected, rel=1e-9)
    assert float(torch.linalg.matrix_norm(m - product(params)) / torch.linalg.matrix_norm(m)) == pytest.approx(expected, rel=1e-9)


def test_averaging_a_and_b_separately_is_not_the_product_average():
    c1, c2 = client(1), client(2)
    separate = (0.5 * c1[f"{DEC}.lora_b.weight"] + 0.5 * c2[f"{DEC}.lora_b.weight"]) @ (
        0.5 * c1[f"{DEC}.lora_a.weight"] + 0.5 * c2[f"{DEC}.lora_a.weight"]
    )
    average = 0.5 * product(c1) + 0.5 * product(c2)
    assert torch.linalg.matrix_norm(separate - average) > 0.1 * torch.linalg.matrix_norm(average)
    # Even one client's update, re-expressed in another basis (B R^-1, R A), breaks the separate average.
    r = torch.tensor([[2.0, 1.0], [0.0, 0.5]], dtype=torch.float64)
    c1_rebased = {**c1, f"{DEC}.lora_a.weight": r @ c1[f"{DEC}.lora_a.weight"],
                  f"{DEC}.lora_b.weight": c1[f"{DEC}.lora_b.weight"] @ torch.linalg.inv(r)}
    params, _ = aggregate_lora([(c1, 1), (c1_rebased, 1)], rank=2)
    torch.testing.assert_close(product(params), product(c1))


def test_non_lora_keys_are_weighted_by_sample_counts_and_keep_dtype():
    c1 = {**client(1, bias=1.0), "steps": torch.tensor(10), "norm.weight": np.full(2, 4.0, np.float32)}
    c2 = {**client(2, bias=5.0), "steps": torch.tensor(30), "norm.weight": np.full(2, 8.0, np.float32)}
    params, _ = aggregate_lora([(c1, 30), (c2, 10)])
    torch.testing.assert_close(params["head.bias"], torch.full((3,), 0.75 * 1.0 + 0.25 * 5.0, dtype=torch.float64))
    assert params["steps"].dtype == torch.int64 and int(params["steps"]) == 15
    assert isinstance(params["norm.weight"], np.ndarray) and params["norm.weight"].dtype == np.float32
    np.testing.assert_allclose(params["norm.weight"], 5.0)


def test_float32_numpy_lora_factors_come_back_as_float32_numpy():
    c1 = {k: v.float().numpy() for k, v in client(1).items()}
    c2 = {k: v.float().numpy() for k, v in client(2).items()}
    params, _ = aggregate_lora([(c1, 1), (c2, 1)], rank=4)
    a, b = params[f"{DEC}.lora_a.weight"], params[f"{DEC}.lora_b.weight"]
    assert isinstance(a, np.ndarray) and a.dtype == b.dtype == np.float32
    expected = 0.5 * c1[f"{DEC}.lora_b.weight"] @ c1[f"{DEC}.lora_a.weight"] + 0.5 * c2[f"{DEC}.lora_b.weight"] @ c2[f"{DEC}.lora_a.weight"]
    np.testing.assert_allclose(b @ a, expected, atol=1e-5)


@pytest.mark.parametrize(
    "second, message",
    [
        ({k: v for k, v in client(2).items() if k != "head.bias"}, "missing"),
        ({**client(2), "extra": torch.zeros(1)}, "unexpected"),
        ({**client(2), "head.bias": torch.zeros(4)}, "shapes"),
        (client(2, rank=3), "shapes"),
    ],
)
def test_mismatched_clients_raise(second, message):
    with pytest.raises(ValueError, match=message):
        aggregate_lora([(client(1), 1), (second, 1)])


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="partner"):
        aggregate_lora([({f"{DEC}.lora_a.weight": torch.zeros(2, 5)}, 1)])
    with pytest.raises(ValueError, match="multiply"):
        aggregate_lora([({f"{DEC}.lora_a.weight": torch.zeros(2, 5), f"{DEC}.lora_b.weight": torch.zeros(6, 3)}, 1)])
    with pytest.raises(ValueError, match="weight"):
        aggregate_lora([(client(1), 0)])
    with pytest.raises(ValueError):
        aggregate_lora([])


# --- NVFlare aggregator, with the real LoRA names of a tiny FLAP-SAM ------------------------------


@pytest.fixture(scope="module")
def tiny_flapsam():
    return build_model("flapsam", "flap", "tiny", 64, lora_init="default")


def perturbed(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A client's trainable state after 'training': the model's trainable parameters plus noise."""
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters() if p.requires_grad}


def fl_model(params: dict, steps: float | None = None, params_type=ParamsType.FULL, name: str = "site-1") -> FLModel:
    meta = {"client_name": name} | ({} if steps is None else {FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps})
    return FLModel(params=params, params_type=params_type, meta=meta)


def test_aggregator_end_to_end_with_real_lora_names(tiny_flapsam, caplog):
    model = tiny_flapsam
    c1, c2 = perturbed(model, 1), perturbed(model, 2)
    layers = lora_pairs(c1)
    assert f"{ENC}.lora_q" in layers and f"{ENC}.lora_v" in layers and f"{DEC}.lora" in layers

    aggregator = LoRASVDAggregator()
    aggregator.reset_stats()  # as FedAvg does at the start of every round
    aggregator.accept_model(fl_model(c1, steps=30, name="site-1"))
    aggregator.accept_model(fl_model(c2, steps=10, name="site-2"))
    with caplog.at_level(logging.INFO, logger="fedfms.fl.aggregators.lora_svd"):
        result = aggregator.aggregate_model()

    assert result.params_type == ParamsType.FULL and result.params.keys() == c1.keys()
    errors = result.meta["lora_svd_relative_error"]
    assert errors.keys() == layers.keys()
    assert result.meta["lora_svd_max_relative_error"] == max(errors.values())
    assert errors[f"{ENC}.lora_q"] > 0  # 64x64 encoder q: two rank-32 updates do not fit in rank 32
    assert errors[f"{DEC.replace('self_attn', 'cross_attn_token_to_image')}.lora"] < 1e-6  # out = 32 = r: always exact
    assert "relative truncation error" in caplog.text and f"max {max(errors.values()):.3e}" in caplog.text

    missing, unexpected = model.load_state_dict(result.params, strict=False)
    assert not unexpected
    qkv = model.image_encoder.blocks[0].attn.qkv
    loaded = (qkv.lora_b_v.weight @ qkv.lora_a_v.weight).double()
    a_key, b_key = layers[f"{ENC}.lora_v"]
    average = 0.75 * c1[b_key].double() @ c1[a_key].double() + 0.25 * c2[b_key].double() @ c2[a_key].double()
    relative = float(torch.linalg.matrix_norm(loaded - average) / torch.linalg.matrix_norm(average))
    assert relative == pytest.approx(errors[f"{ENC}.lora_v"], abs=1e-5)  # the best rank-32 approximation, as reported
    head = "mask_decoder.mask_tokens.weight"
    torch.testing.assert_close(result.params[head], 0.75 * c1[head] + 0.25 * c2[head])


def test_aggregator_resets_between_rounds(tiny_flapsam):
    c1, c2, c3 = (perturbed(tiny_flapsam, seed) for seed in (1, 2, 3))
    aggregator = LoRASVDAggregator()
    aggregator.accept_model(fl_model(c1, steps=1))
    aggregator.accept_model(fl_model(c2, steps=1))
    assert aggregator.aggregate_model().meta["lora_svd_max_relative_error"] > 0
    aggregator.accept_model(fl_model(c3, steps=5))  # round 2: c1 and c2 must be gone
    result = aggregator.aggregate_model()
    assert result.meta["lora_svd_max_relative_error"] < 1e-6  # one client's rank-32 update fits exactly
    pairs = lora_pairs(c3)
    for a_key, b_key in pairs.values():
        torch.testing.assert_close(result.params[b_key] @ result.params[a_key], c3[b_key] @ c3[a_key], atol=1e-5, rtol=1e-5)
    paired = {key for pair in pairs.values() for key in pair}
    for key in c3.keys() - paired:
        torch.testing.assert_close(result.params[key], c3[key])
    aggregator.accept_model(fl_model(c1, steps=1))
    aggregator.reset_stats()
    with pytest.raises(RuntimeError, match="no client model"):
        aggregator.aggregate_model()


def test_aggregator_rejects_diff_and_mismatch_and_logs_error(monkeypatch):
    aggregator = LoRASVDAggregator()
    logged = []
    monkeypatch.setattr(aggregator, "error", logged.append)
    with pytest.raises(ValueError, match="FULL"):
        aggregator.accept_model(fl_model(client(1), steps=1, params_type=ParamsType.DIFF, name="site-3"))
    assert "site-3" in logged[0] and "DIFF" in logged[0]
    aggregator.accept_model(fl_model(client(1), steps=1))
    with pytest.raises(ValueError, match="unexpected"):
        aggregator.accept_model(fl_model({**client(2), "extra": torch.zeros(1)}, steps=1))
    assert len(logged) == 2
    params, _ = aggregate_lora([(client(1), 1)])
    result = aggregator.aggregate_model()  # rejected models left no trace
    for key in params:
        torch.testing.assert_close(result.params[key], params[key])


def test_aggregator_weight_from_meta_defaults_to_one_with_warning(monkeypatch):
    aggregator = LoRASVDAggregator()
    warnings = []
    monkeypatch.setattr(aggregator, "warning", warnings.append)
    aggregator.accept_model(fl_model(client(1, bias=1.0)))  # no NUM_STEPS_CURRENT_ROUND: weight 1
    aggregator.accept_model(fl_model(client(2, bias=4.0), steps=2.0))
    result = aggregator.aggregate_model()
    assert len(warnings) == 1 and FLMetaKey.NUM_STEPS_CURRENT_ROUND in warnings[0]
    torch.testing.assert_close(result.params["head.bias"], torch.full((3,), 3.0, dtype=torch.float64))


def test_aggregator_reads_a_custom_weight_key_and_logs_error_stats(monkeypatch):
    aggregator = LoRASVDAggregator(rank=4, weight_key="num_samples")
    infos = []
    monkeypatch.setattr(aggregator, "info", infos.append)
    for seed, n in ((1, 30), (2, 10)):
        aggregator.accept_model(FLModel(params=client(seed, bias=seed), meta={"num_samples": n}))
    result = aggregator.aggregate_model()
    torch.testing.assert_close(result.params["head.bias"], torch.full((3,), 1.25, dtype=torch.float64))
    assert len(infos) == 1 and "max" in infos[0] and "mean" in infos[0]


def test_fedavg_controller_callback_drops_rejected_models():
    """Pins the NVFlare 2.9 contract relied on: FedAvg ignores accept_model's return value, so rejection
    must raise; the exception leaves the result callback (whose caller logs it and marks the
    contribution not accepted) before the received count is incremented."""
    from nvflare.app_common.workflows.fedavg import FedAvg

    controller = FedAvg(num_clients=2, num_rounds=1, aggregator=LoRASVDAggregator(), persistor_id="")
    controller.current_round, controller._received_count, controller._expected_count = 0, 0, 2
    with pytest.raises(ValueError, match="FULL"):
        controller._aggregate_one_result(fl_model(client(1), steps=1, params_type=ParamsType.DIFF))
    assert controller._received_count == 0
    assert controller._aggregate_one_result(fl_model(client(2), steps=1)) is True
    result = controller._get_aggregated_result()
    assert result.meta["nr_aggregated"] == 1 and "lora_svd_relative_error" in result.meta
    torch.testing.assert_close(product(result.params), product(client(2)))


def test_factors_are_contiguous_for_nvflare_streaming():
    a, b, _ = refactorize(torch.randn(12, 8), rank=3)
    assert a.is_contiguous() and b.is_contiguous()
