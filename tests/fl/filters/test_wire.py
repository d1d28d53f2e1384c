"""The payload bytes a site measures, as NVFlare's FOBS serialises the task data and result."""

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext

from fedfms.fl.filters.wire import DOWN_HEADER, UP_HEADER, WireBytes, serialised_bytes, wire_bytes


def _shareable(dtype=torch.float32):
    params = {f"layer{i}.weight": torch.randn(100, 50).to(dtype) for i in range(4)}
    return DXO(DataKind.WEIGHTS, data=params).to_shareable(), sum(v.numel() * v.element_size() for v in params.values())


def test_both_directions_are_measured_and_carried_in_the_result():
    """The same task context carries the down count from the data filter to the result filter."""
    fl_ctx = FLContext()
    task, raw = _shareable()
    assert WireBytes("down").process(task, fl_ctx) is task
    result, _ = _shareable(torch.float16)
    WireBytes("up").process(result, fl_ctx)
    down, up = wire_bytes(result)
    assert down == serialised_bytes(task) and 0 < down - raw < 4096  # the tensors' bytes plus FOBS framing and headers
    assert 0 < up - raw // 2 < 4096  # half precision: half the bytes
    assert result.get_header(DOWN_HEADER) == down and result.get_header(UP_HEADER) == up
    assert from_shareable(result).data["layer0.weight"].dtype == torch.float16  # the filter measures, never changes


def test_a_result_without_the_filters_has_no_counts():
    result, _ = _shareable()
    assert wire_bytes(result) == (None, None)


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="direction must be one of down, up"):
        WireBytes("sideways")
