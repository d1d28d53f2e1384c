"""What travels: trainable parameters, and normalisation statistics unless FedBN keeps them local."""

import pytest
from torch import nn

from fedfms.fl.exchange import exchanged_keys
from fedfms.models import build_model


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1), nn.InstanceNorm2d(1, affine=True))


def test_batch_norm_statistics_travel_with_the_weights_by_default():
    keys = exchanged_keys(_net())
    assert keys == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "3.weight", "3.bias", "4.weight", "4.bias"]
    assert "1.num_batches_tracked" not in keys  # a local step count, never averaged


def test_fedbn_keeps_normalisation_layers_at_the_site():
    assert exchanged_keys(_net(), "local") == ["0.weight", "0.bias", "3.weight", "3.bias"]
    with pytest.raises(ValueError, match="unknown norm_statistics"):
        exchanged_keys(_net(), "site")


def test_frozen_normalisation_layers_keep_their_pretrained_statistics():
    """LiteMedSAM's encoder under a PEFT strategy: its BatchNorm layers neither train nor travel."""
    network = build_model("sam", "pdec", size="lite", image_size=128)
    keys = set(exchanged_keys(network))
    assert not any(k.startswith("image_encoder.") for k in keys)
    assert keys == {n for n, p in network.named_parameters() if p.requires_grad}
    full = set(exchanged_keys(build_model("sam", "full", size="lite", image_size=128)))
    assert any(k.endswith("running_mean") for k in full)
