"""What travels between the server and the sites: one definition for the learner and the persistor.

The strategy's trainable parameters always travel. Normalisation layers also carry running
statistics (BatchNorm's ``running_mean`` and ``running_var``), which are buffers, not parameters:

``global`` (default)  the statistics of every trainable normalisation layer travel with the
                      weights and are averaged like them, so the global model is complete: what
                      the server saves is what a user runs, and what the final test scores.
``local``             FedBN: normalisation layers (their weights and statistics) never leave
                      the site; every site keeps its own, and the global model has the
                      statistics it started with (say so when reporting its scores).

The statistics of a frozen layer (e.g. LiteMedSAM's encoder under a PEFT strategy) stay as
pretrained, so they do not travel either way. ``num_batches_tracked`` never travels: it only
counts local steps.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

NORM_STATISTICS = ("global", "local")
RUNNING_STATISTICS = ("running_mean", "running_var")
#: Key of every task's meta: the id of the federated run (the first of a resumed chain), under which sites keep their own state.
RUN_ID = "fedfms_run_id"


def exchanged_keys(network: nn.Module, norm_statistics: str = "global") -> list[str]:
    """The state-dict keys of ``network`` that travel, in state-dict order."""
    if norm_statistics not in NORM_STATISTICS:
        raise ValueError(f"unknown norm_statistics {norm_statistics!r}; expected one of {', '.join(NORM_STATISTICS)}")
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    norm_layers = {name: m for name, m in network.named_modules() if isinstance(m, _NormBase)}
    keys = set()
    for prefix, layer in norm_layers.items():
        owned = {f"{prefix}.{n}" for n, _ in layer.named_parameters(recurse=False)}
        if norm_statistics == "local":
            trainable -= owned
        elif owned & trainable:
            keys |= {f"{prefix}.{s}" for s in RUNNING_STATISTICS if getattr(layer, s, None) is not None}
    keys |= trainable
    return [k for k in network.state_dict() if k in keys]


def local_keys(network: nn.Module, norm_statistics: str = "global") -> list[str]:
    """The state-dict keys a site keeps for itself: under FedBN (``local``), those of its trainable normalisation layers."""
    if norm_statistics != "local":
        return []
    kept = set(exchanged_keys(network, "global")) - set(exchanged_keys(network, "local"))
    return [k for k in network.state_dict() if k in kept]
