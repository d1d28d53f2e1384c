"""Compressed exchange: round trips within each mode's bound, bytes on the wire, bad payloads, and real simulator runs."""

import json

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedfms.bundle import bundle_network
from fedfms.fl.aggregators.lora_svd import lora_pairs
from fedfms.fl.checks.updates import UpdateValidator
from fedfms.fl.filters.compression import (
    MODES, PAYLOAD_ERROR, STATE, CompressWeights, DecompressWeights, PayloadError, compress, decompress, error_bound,
)
from fedfms.fl.filters.wire import serialised_bytes
from tests.fl.conftest import APP, WIRE_OVERHEAD, job_copy, simulate

# Bytes per fp32 byte of each mode: the codes, plus one fp32 block scale per 4096 (8-bit) or 64 (4-bit) values.
SIZE_FACTOR = {"fp16": 1 / 2, "bf16": 1 / 2, "blockwise8": 1 / 4 + 1 / 4096, "nf4": 1 / 8 + 1 / 64, "fp4": 1 / 8 + 1 / 64}
STATE_OVERHEAD_PER_TENSOR = 1024  # each compressed tensor's source dtype, shape and scales, as FOBS frames them


def _params():
    torch.manual_seed(0)
    return {
        "encoder.weight": torch.randn(300, 70),
        "encoder.bias": torch.randn(13) * 1e-3,  # small values: bounded by their own block's scale, not the big tensor's
        "server.numpy": np.random.default_rng(0).standard_normal((65, 3)).astype(np.float32),  # the server's persistor hands out arrays
        "double": torch.randn(5, 5, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7),
    }


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_is_within_the_modes_bound_and_restores_type_dtype_and_shape(mode):
    params = _params()
    data, state = compress(params, mode)
    restored = decompress(data, state)
    assert restored.keys() == params.keys()
    assert torch.equal(restored["bn.num_batches_tracked"], params["bn.num_batches_tracked"])  # integers travel as they are
    for key in ("encoder.weight", "encoder.bias", "server.numpy", "double"):
        before, after = params[key], restored[key]
        assert type(after) is type(before) and after.dtype == before.dtype and after.shape == before.shape
        before, after = torch.as_tensor(before).double(), torch.as_tensor(after).double()
        error = (after - before).abs().max()
        assert 0 < error <= error_bound(mode) * 1.0001 * before.abs().max(), key  # lossy, but never beyond the bound
        assert data[key].element_size() * data[key].numel() < before.numel() * 4  # and fewer bytes than fp32


def test_bounds_are_half_the_widest_gap_of_each_code_book():
    assert error_bound("fp16") == 2**-11 and error_bound("bf16") == 2**-8
    assert error_bound("blockwise8") < 0.008 and 0.15 < error_bound("nf4") < error_bound("fp4") <= 1 / 6 + 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_serialised_payload_shrinks_by_the_modes_factor(mode):
    params = {f"layer{i}.weight": torch.randn(256, 256) for i in range(4)}
    raw = sum(v.numel() * 4 for v in params.values())
    plain = serialised_bytes(DXO(DataKind.WEIGHTS, data=params).to_shareable())
    packed = CompressWeights(mode).process(DXO(DataKind.WEIGHTS, data=params).to_shareable(), FLContext())
    size = serialised_bytes(packed)
    assert abs(size - SIZE_FACTOR[mode] * raw) < (plain - raw) + STATE_OVERHEAD_PER_TENSOR * len(params), (size, raw)


def test_filters_leave_the_shared_data_alone_and_restore_it():
    """The server's task data is one dict shared by every site's copy: compression must not change it in place."""
    params = _params()
    task = DXO(DataKind.WEIGHT_DIFF, data=params, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 4}).to_shareable()
    sent = CompressWeights("nf4").process(task, FLContext())
    assert params["encoder.weight"].dtype == torch.float32 and from_shareable(sent).data is not params
    arrived = from_shareable(DecompressWeights().process(sent, FLContext()))
    assert arrived.data_kind == DataKind.WEIGHT_DIFF and arrived.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] == 4 and STATE not in arrived.meta
    assert arrived.get_filter_history() == ["CompressWeights", "DecompressWeights"]
    assert arrived.data["encoder.weight"].dtype == torch.float32
    plain = DXO(DataKind.WEIGHTS, data={"w": torch.ones(3)}).to_shareable()
    assert torch.equal(from_shareable(DecompressWeights().process(plain, FLContext())).data["w"], torch.ones(3))  # uncompressed: as it is


def _broken(mode: str, breaks) -> DXO:
    data, state = compress({"w": torch.randn(100, 10), "b": torch.randn(10)}, mode)
    breaks(data, state)
    return DXO(DataKind.WEIGHTS, data=data, meta={STATE: state, FLMetaKey.NUM_STEPS_CURRENT_ROUND: 8})


BAD_PAYLOADS = {
    "missing scale": ("blockwise8", lambda d, s: s["tensors"]["w"].pop("absmax"), "key w: no block scales (absmax) for a blockwise8 payload"),
    "scales of another size": ("nf4", lambda d, s: s["tensors"]["w"].update(absmax=torch.ones(3)), "key w: (3,) block scales (absmax), 16 finite ones expected"),
    "shape that does not fit": ("fp16", lambda d, s: s["tensors"]["b"].update(shape=[10, 2]), "key b: 10 values for the shape [10, 2]"),
    "codes of another type": ("blockwise8", lambda d, s: d.update(w=d["w"].float()), "key w: a blockwise8 payload holds torch.uint8 values, this one torch.float32"),
    "unknown mode": ("fp16", lambda d, s: s.update(mode="int3"), "unknown compression mode 'int3'"),
    "no source dtype": ("bf16", lambda d, s: s["tensors"]["w"].pop("dtype"), "key w: the compression state lacks a valid source dtype and shape"),
    "described but absent": ("fp4", lambda d, s: d.pop("b"), "key b: described in the compression state but not in the payload"),
}


@pytest.mark.parametrize("name", BAD_PAYLOADS)
def test_a_bad_payload_is_refused_by_the_validator_with_its_reason(name):
    mode, breaks, reason = BAD_PAYLOADS[name]
    payload = _broken(mode, breaks).to_shareable()
    with pytest.raises(PayloadError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        DecompressWeights().process(payload, FLContext())  # at a site: the task fails with the reason
    marked = from_shareable(DecompressWeights(reject_bad_payload=True).process(payload, FLContext()))  # at the server
    assert reason in marked.meta[PAYLOAD_ERROR]
    validator = UpdateValidator()
    validator.expect({"w": torch.zeros(100, 10), "b": torch.zeros(10)}, ["w", "b"])
    update = FLModel(params=marked.data, params_type=ParamsType.FULL, meta=marked.meta)
    assert validator.check("site-1", update) == f"compressed payload cannot be read back: {marked.meta[PAYLOAD_ERROR]}"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown compression mode 'int8'; choose from fp16, bf16, blockwise8, nf4, fp4"):
        CompressWeights("int8")


# ---- real simulator runs ------------------------------------------------------------------------

# One run per mode, 1 round, 2 sites; 3 in the two modes where the third site's payload breaks.
FAULTS = {"blockwise8": "missing_scale", "fp16": "wrong_metadata"}
FAULT_REASONS = {"missing_scale": "no block scales (absmax) for a blockwise8 payload", "wrong_metadata": "values for the shape"}


def _recorders(job, tmp_path, mode):
    """Record each update before and after compression; break site-3's in the modes of :data:`FAULTS`."""
    config = job / "app/config/config_fed_client.json"
    client = json.loads(config.read_text())
    chain = client["task_result_filters"][0]["filters"]
    at = [f["path"].endswith("CompressWeights") for f in chain].index(True)
    after = [{"path": "fedfms.fl.drills.OutgoingUpdateRecorder", "args": {"folder": str(tmp_path / "sent")}}]
    if mode in FAULTS:
        after.append({"path": "fedfms.fl.drills.PayloadCorruptor", "args": {"site": "site-3", "kind": FAULTS[mode]}})
    chain[at + 1:at + 1] = after
    chain.insert(at, {"path": "fedfms.fl.drills.OutgoingUpdateRecorder", "args": {"folder": str(tmp_path / "raw")}})
    config.write_text(json.dumps(client))


# fp4 runs FLAP-SAM: its LoRA-SVD server turns each decompressed change into weights before re-factorising.
JOBS = {mode: ("fedmsa_prostate", "data") for mode in MODES} | {"fp4": ("flapsam_prostate", "data_stack5")}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_compressed_run_aggregates_the_dequantised_changes(fl_data, tmp_path, mode):
    name, data = JOBS[mode]
    job = job_copy(name, tmp_path, fl_data / data, 1, compress=mode)
    _recorders(job, tmp_path, mode)
    log = simulate(job, tmp_path / "ws", clients=3 if mode in FAULTS else 2, expect_success=mode not in FAULTS)
    assert "Traceback" not in log and "Finished FedAvg." in log

    rows = {r["site"]: r for r in json.loads((tmp_path / "ws" / APP / "round_metrics.json").read_text())}
    if mode in FAULTS:
        bad = rows.pop("site-3")
        assert bad["status"] == "rejected" and bad["reason"].startswith("compressed payload cannot be read back: key ")
        assert FAULT_REASONS[FAULTS[mode]] in bad["reason"]
    assert sorted(rows) == ["site-1", "site-2"] and all(r["status"] == "accepted" for r in rows.values())
    assert json.loads((tmp_path / "ws" / APP / "run_status.json").read_text())["status"] == "completed"

    initial = bundle_network(f"bundles/{name}", ["train.json", "cpu_demo.json"]).state_dict()
    saved = torch.load(tmp_path / "ws" / APP / "FL_global_model.pt", weights_only=False)["model"]
    sent = {s: torch.load(tmp_path / "sent" / f"{s}_round0.pt", weights_only=False) for s in rows}
    raw = {s: torch.load(tmp_path / "raw" / f"{s}_round0.pt", weights_only=False) for s in rows}
    assert all(r["kind"] == DataKind.WEIGHT_DIFF and STATE not in r["meta"] for r in raw.values())  # the round's change travels
    weights = {s: float(r["meta"][FLMetaKey.NUM_STEPS_CURRENT_ROUND]) for s, r in sent.items()}
    arrived = {s: decompress(r["data"], r["meta"][STATE]) for s, r in sent.items()}
    total = sum(weights.values())
    size, tensors = rows["site-1"]["bytes_received"], len(arrived["site-1"])  # the exchanged tensors' fp32 bytes
    for row in rows.values():  # measured on the wire, both ways: the mode's share of fp32
        for direction in ("up", "down"):
            assert abs(row[f"wire_bytes_{direction}"] - SIZE_FACTOR[mode] * size) < WIRE_OVERHEAD + STATE_OVERHEAD_PER_TENSOR * tensors, (direction, row)
    lora = {key for pair in lora_pairs(arrived["site-1"]).values() for key in pair}
    if name == "flapsam_prostate":
        assert lora and "LoRA SVD aggregation of 2 clients over" in log and all(not torch.equal(torch.as_tensor(saved[k]), initial[k]) for k in lora)
    for key in set(arrived["site-1"]) - lora:  # every plain tensor: the weighted mean of the changes
        start, value = initial[key].double(), torch.as_tensor(saved[key]).double()
        mean = sum(weights[s] * torch.as_tensor(arrived[s][key]).double() for s in rows) / total
        assert torch.allclose(value, start + mean, atol=1e-6), key  # the server added exactly what it decompressed
        exact = sum(weights[s] * raw[s]["data"][key].double() for s in rows) / total
        bound = max(error_bound(mode) * raw[s]["data"][key].abs().max().item() for s in rows)
        assert (value - start - exact).abs().max() <= bound * 1.0001 + 1e-6, key  # and within the mode's bound of the exact mean
