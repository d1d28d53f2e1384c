"""The embedding cache of a frozen encoder: the same outputs and training as without it, emptied when the encoder changes, bounded."""

import pytest
import torch

from fedfms.models import build_model
from fedfms.models.embedding_cache import EmbeddingCache


def frozen_encoder_net(cache_mb: float = 64, strategy: str = "dec", seed: int = 0):
    torch.manual_seed(seed)
    return build_model("flapsam", strategy, size="tiny", image_size=32, num_classes=1, embedding_cache_mb=cache_mb)


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_cached_outputs_equal_recomputed_ones_and_later_calls_hit():
    cached, plain = frozen_encoder_net(), frozen_encoder_net(cache_mb=0)
    assert plain.embedding_cache is None
    x = images()
    with torch.no_grad():
        first, again, reference = cached(x), cached(x), plain(x)
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, reference, rtol=0, atol=1e-6)
    assert (cached.embedding_cache.misses, cached.embedding_cache.hits) == (4, 4)
    flipped = torch.flip(x, dims=[-1])  # an augmented image is another image: its own embedding, not the original's
    with torch.no_grad():
        torch.testing.assert_close(cached(flipped), plain(flipped), rtol=0, atol=1e-6)
    assert cached.embedding_cache.misses == 8


def test_a_batch_mixing_seen_and_new_images_keeps_their_order():
    cached, plain = frozen_encoder_net(), frozen_encoder_net(cache_mb=0)
    x, y = images(3, seed=1), images(3, seed=2)
    mixed = torch.cat([y[:1], x[1:2], y[1:], x[:1]])
    with torch.no_grad():
        cached(x)
        torch.testing.assert_close(cached(mixed), plain(mixed), rtol=0, atol=1e-6)
    assert cached.embedding_cache.hits == 2


def test_training_with_the_cache_follows_the_same_loss_curve():
    losses = {}
    for cache_mb in (0, 64):
        net = frozen_encoder_net(cache_mb)
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        torch.manual_seed(3)
        x, y = images(8), (torch.rand(8, 1, 32, 32) > 0.5).long()
        curve = []
        for epoch in range(3):
            for batch in (slice(0, 4), slice(4, 8)):
                loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch, 0])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                curve.append(loss.item())
        losses[cache_mb] = curve
    assert losses[64] == pytest.approx(losses[0], abs=1e-6)
    assert losses[0][0] != pytest.approx(losses[0][-1])  # the decoder did learn


def test_a_changed_encoder_empties_the_cache():
    net, other = frozen_encoder_net(), frozen_encoder_net(seed=5)
    x = images()
    with torch.no_grad():
        net(x)
        assert len(net.embedding_cache) == 4
        net.image_encoder.load_state_dict(other.image_encoder.state_dict())  # in place: new versions of the same tensors
        torch.testing.assert_close(net.encode(net._rgb(x)), other.image_encoder(other._rgb(x)), rtol=0, atol=1e-6)
    assert net.embedding_cache.misses == 8


def test_memory_bound_drops_the_least_recently_used():
    net = frozen_encoder_net()
    with torch.no_grad():
        one = net.image_encoder(net._rgb(images(1))).numel() * 4
    cache = EmbeddingCache(max_mb=2.5 * one / 2**20)  # room for two embeddings
    x = net._rgb(images(3))
    cache.embed(net.image_encoder, x[:2])
    cache.embed(net.image_encoder, x[:1])  # the first is now the most recently used
    cache.embed(net.image_encoder, x[2:])
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    cache.embed(net.image_encoder, x[:1])
    assert cache.hits == 2  # the first was kept; the second was dropped
    with pytest.raises(ValueError, match="embedding cache size must be > 0 MiB"):
        EmbeddingCache(0)


def test_a_trained_encoder_is_never_cached():
    net = frozen_encoder_net(strategy="flap")  # LoRA in the encoder: its embeddings change every step
    with torch.no_grad():
        net(images())
    assert len(net.embedding_cache) == 0


def test_the_bundles_build_the_cache_with_the_configured_bound():
    from fedfms.bundle import bundle_network

    config = ["train.json", "cpu_demo.json"]
    network = bundle_network("bundles/flapsam_prostate", config, strategy="dec", size="tiny", pretrained_checkpoint="scratch")
    assert network.embedding_cache.max_bytes == 1024 * 2**20
    assert bundle_network("bundles/flapsam_prostate", config, strategy="dec", size="tiny", pretrained_checkpoint="scratch", embedding_cache_mb=0).embedding_cache is None


def test_switching_modes_keeps_the_cache_of_litemedsams_encoder():
    """TinyViT's attention keeps a bias table only in eval mode (a buffer that comes and goes): not a change of the encoder."""
    torch.manual_seed(0)
    net = build_model("flapsam", "dec", size="lite", image_size=64, num_classes=1, embedding_cache_mb=64).train()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        net(x)
        net.eval()
        net(x)
        net.train()
        net(x)
    assert (net.embedding_cache.misses, net.embedding_cache.hits) == (4, 2)  # train and eval entries; the second train pass hits
