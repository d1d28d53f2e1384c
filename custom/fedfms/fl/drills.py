"""Fault drills: a site that breaks on purpose, and a record of what leaves a site.

A federation is only known to survive bad or silent sites once it has been seen to. Put
:class:`FaultInjectingLearner` in place of a job's :class:`~fedfms.fl.executors.learner.BundleLearner`
(same arguments, plus ``faults``) and the chosen sites misbehave in the chosen rounds, where a
real fault would happen: in ``train``. :class:`OutgoingUpdateRecorder`, as the last of a site's
``task_result_filters``, saves every update exactly as it leaves the site (after any privacy
filter), so a drill or a test can check what the server received and aggregated.
:class:`PayloadCorruptor`, after a site's compression filter, breaks that site's compressed
updates (``missing_scale``: no block scales; ``wrong_metadata``: shapes that do not fit the values).

Fault kinds (``{"site": "site-2", "round": 1, "kind": ..., ...}``; any fault may also carry
``"delay": seconds`` to answer that much later, e.g. to make a bad update arrive last):

    nan            every floating tensor of the update is NaN
    nan_inf        one NaN and one Inf value, in the first two tensors
    frozen_key     the update also carries ``key``, a weight the model has but does not exchange
    unknown_key    the update also carries a key the model does not have
    missing_keys   ``count`` exchanged keys (default 3) are left out
    wrong_shape    ``key`` (default: the last) loses its last element
    weight         the sample count (FedAvg's weight) is ``value``: 1e12, 0, -5, "nan", ...
    scale          every floating tensor is multiplied by ``factor`` (finite, e.g. 1e6)
    boost          the change against the received global model is multiplied by ``factor``
                   (a plausible-looking update that pulls the average its way)
    exception      ``train`` raises
    hang           ``train`` sleeps ``seconds`` first (longer than the task timeout: a silent site)
    die            the site's process exits at once
    delay          ``train`` sleeps ``seconds`` first and then answers normally (arrival order)

A fault with ``"task": "validate"`` happens in the final evaluation instead (kinds ``exception``,
``hang``, ``die``; its ``round`` is ignored).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReturnCode, Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants

from fedfms.fl.executors.learner import BundleLearner
from fedfms.fl.filters.compression import STATE

FAULT_KINDS = ("nan", "nan_inf", "frozen_key", "unknown_key", "missing_keys", "wrong_shape", "weight", "scale", "boost", "exception", "hang", "die", "delay")
FINAL_EVALUATION_KINDS = ("exception", "hang", "die")


class FaultInjectingLearner(BundleLearner):
    """A :class:`BundleLearner` whose ``train`` misbehaves as ``faults`` say (see the module docstring)."""

    def __init__(self, *args, faults: list[dict] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.faults = list(faults or [])
        unknown = sorted({f.get("kind") for f in self.faults} - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; expected {', '.join(FAULT_KINDS)}")
        wrong = sorted({f["kind"] for f in self.faults if f.get("task") == "validate"} - set(FINAL_EVALUATION_KINDS))
        if wrong:
            raise ValueError(f"fault kinds {wrong} cannot happen in the final evaluation; expected {', '.join(FINAL_EVALUATION_KINDS)}")

    def train(self, model: FLModel) -> FLModel:
        fault = next((f for f in self.faults if f["site"] == self.site_name and f["round"] == self.current_round and f.get("task", "train") == "train"), None)
        if fault is None:
            return super().train(model)
        global_params = {k: torch.as_tensor(v).clone() for k, v in model.params.items()} if fault["kind"] == "boost" else None
        self._misbehave(fault, "train")
        return _corrupt(super().train(model), fault, self.network, global_params)

    def validate(self, model: FLModel) -> FLModel:
        final = (model.meta or {}).get("split") == "testing"
        fault = next((f for f in self.faults if final and f["site"] == self.site_name and f.get("task") == "validate"), None)
        if fault is not None:
            self._misbehave(fault, "the final evaluation")
        return super().validate(model)

    def _misbehave(self, fault: dict, where: str) -> None:
        """The faults that happen before the work: a delay, an exception, a hang, a death."""
        self.warning(f"injecting fault {fault}")
        time.sleep(fault.get("delay", 0))
        kind = fault["kind"]
        if kind == "exception":
            raise RuntimeError(f"injected fault: {where} failed at {self.site_name} in round {self.current_round}")
        if kind == "die":
            os._exit(13)
        if kind in ("hang", "delay"):
            time.sleep(fault["seconds"])


def _corrupt(update: FLModel, fault: dict, network: torch.nn.Module, global_params: dict | None = None) -> FLModel:
    params, kind = update.params, fault["kind"]
    keys = [k for k, v in params.items() if v.is_floating_point()]
    if kind == "nan":
        for key in keys:
            params[key] = torch.full_like(params[key], float("nan"))
    elif kind == "nan_inf":
        params[keys[0]].view(-1)[0] = float("nan")
        params[keys[1]].view(-1)[0] = float("inf")
    elif kind == "frozen_key":
        params[fault["key"]] = network.state_dict()[fault["key"]].detach().clone() + 1.0
    elif kind == "unknown_key":
        params["not_in_the_model.weight"] = torch.zeros(4)
    elif kind == "missing_keys":
        for key in list(params)[: fault.get("count", 3)]:
            del params[key]
    elif kind == "wrong_shape":
        key = fault.get("key", list(params)[-1])
        params[key] = params[key].reshape(-1)[:-1]
    elif kind == "scale":
        for key in keys:
            params[key] = params[key] * float(fault["factor"])
    elif kind == "boost":
        for key in keys:
            start = torch.as_tensor(global_params[key]).to(params[key].dtype)
            params[key] = start + (params[key] - start) * float(fault["factor"])
    elif kind == "weight":
        value = float(fault["value"])
        update.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] = value
        update.meta["num_train_samples"] = value
    return update


class OutgoingUpdateRecorder(Filter):
    """Saves each task result as it leaves the site: ``<folder>/<site>_round<R>.pt`` (``data``, ``meta``, ``kind``).

    Place it last in ``task_result_filters`` for the tasks to record (e.g. ``["train"]``).
    """

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = Path(folder)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no update
        dxo = from_shareable(shareable)
        site = fl_ctx.get_identity_name()
        round_ = shareable.get_header(AppConstants.CURRENT_ROUND)  # the learner states the round it answers
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"data": {k: torch.as_tensor(v).clone() for k, v in (dxo.data or {}).items()}, "meta": dict(dxo.meta), "kind": dxo.data_kind}
        torch.save(record, self.folder / f"{site}_round{round_}.pt")
        return shareable


class PayloadCorruptor(Filter):
    """Breaks every compressed update ``site`` sends (see the module docstring); place it after ``CompressWeights``.

    Args:
        site: the site whose updates break.
        kind: ``missing_scale`` (every tensor's block scales dropped) or ``wrong_metadata`` (every
            tensor's recorded shape gains a dimension of 2).
    """

    KINDS = ("missing_scale", "wrong_metadata")

    def __init__(self, site: str, kind: str) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown payload fault {kind!r}; choose from {', '.join(self.KINDS)}")
        self.site, self.kind = site, kind

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_identity_name() != self.site or shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        state = copy.deepcopy(dxo.meta[STATE])
        for entry in state["tensors"].values():
            if self.kind == "missing_scale":
                entry.pop("absmax", None)
            else:
                entry["shape"] = [*entry["shape"], 2]
        dxo.meta[STATE] = state
        return dxo.update_shareable(shareable)
