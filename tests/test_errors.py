"""Bad input raises ValueError/TypeError naming the argument, the value and what is allowed."""

import re

import pytest
import torch

from tucker_attention import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    TuckerAttention,
    make_attention,
)

CASES = [
    (lambda: MultiHeadAttention(30, 4), ValueError, "d_model=30 must be divisible by n_heads=4"),
    (lambda: MultiHeadAttention(32, 0), ValueError, "n_heads must be an integer >= 1, got 0"),
    (lambda: MultiHeadAttention(32, 4.0), TypeError, "n_heads must be an integer >= 1, got 4.0"),
    (lambda: GroupedQueryAttention(32, 4, 3), ValueError, "n_heads=4 must be divisible by n_kv_heads=3; allowed n_kv_heads: [1, 2, 4]"),
    (lambda: GroupedQueryAttention(32, 4, 8), ValueError, "n_kv_heads must be an integer in [1, 4], got 8"),
    (lambda: MultiHeadAttention(32, 4, dropout=1.0), ValueError, "dropout must be a finite float in [0, 1), got 1.0"),
    (lambda: MultiHeadAttention(32, 4, scale=-1.0), ValueError, "scale must be a positive finite float or None, got -1.0"),
    (lambda: MultiHeadAttention(36, 4, rope=True), ValueError, "head_dim (the RoPE width) must be even for RoPE (it rotates pairs of coordinates), got 9"),
    (lambda: TuckerAttention(32, 4, (0, 8, 8)), ValueError, "ranks[0] (r1) must be an integer in [1, 4], got 0"),
    (lambda: TuckerAttention(32, 4, (5, 8, 8)), ValueError, "ranks[0] (r1) must be an integer in [1, 4], got 5"),
    (lambda: TuckerAttention(32, 4, (2, 33, 8)), ValueError, "ranks[1] (r2) must be an integer in [1, 32], got 33"),
    (lambda: TuckerAttention(32, 4, (2, 8, 40)), ValueError, "ranks[2] (r3) must be an integer in [1, 32], got 40"),
    (lambda: TuckerAttention(32, 4, (2, 8)), ValueError, "ranks must have 3 entries (r1, r2, r3), got (2, 8)"),
    (lambda: TuckerAttention(32, 4, "2,8,8"), TypeError, "ranks must be a sequence of 3 ints"),
    (lambda: TuckerAttention(32, 4, (2, 8, 8), value_ranks=(2, 8, 0)), ValueError, "value_ranks[2] (r3) must be an integer in [1, 32], got 0"),
    (lambda: TuckerAttention(32, 4, (2, 8, 7), rope=True), ValueError, "ranks[2] (r3, the latent RoPE width) must be even for RoPE (it rotates pairs of coordinates), got 7"),
    (lambda: TuckerAttention(32, 4, (2, 8, 8), value_ranks=(2, 8, 6), shared_kv=True), ValueError,
     "value_ranks[2] must equal ranks[2]=8, got 6"),
    (lambda: MultiHeadLatentAttention(32, 4, 40), ValueError, "kv_rank must be an integer in [1, 32], got 40"),
    (lambda: MultiHeadLatentAttention(32, 4, 8, q_rank=0), ValueError, "q_rank must be an integer in [1, 32], got 0"),
    (lambda: MultiHeadLatentAttention(32, 4, 8, rope="head"), ValueError, "rope must be one of [None, 'decoupled', 'latent'] (True means 'latent', False means None) for MultiHeadLatentAttention, got 'head'"),
    (lambda: TuckerAttention(32, 4, (2, 8, 8), rope="decoupled"), ValueError, "rope must be one of [None, 'latent'] (True means 'latent', False means None) for TuckerAttention, got 'decoupled'"),
    (lambda: MultiHeadAttention(32, 4, rope="latent"), ValueError, "rope must be one of [None, 'head'] (True means 'head', False means None) for MultiHeadAttention, got 'latent'"),
    (lambda: MultiHeadLatentAttention(32, 4, 8, latent_norm=True, norm_eps=0), ValueError, "norm_eps must be a float in (0, 1), got 0"),
    (lambda: MultiHeadLatentAttention(32, 4, 7, rope="latent"), ValueError, "kv_rank (the latent RoPE width) must be even for RoPE (it rotates pairs of coordinates), got 7"),
    (lambda: MultiHeadLatentAttention(32, 4, 8, rope="decoupled", rope_dim=5), ValueError, "rope_dim must be even for RoPE (it rotates pairs of coordinates), got 5"),
    (lambda: MultiHeadLatentAttention(32, 4, 8, rope_dim=4), ValueError, "rope_dim is only used with rope='decoupled'"),
    (lambda: make_attention("lora", 32, 4), ValueError,
     "method must be one of ['gqa', 'mha', 'mla', 'mqa', 'tucker', 'tucker_heads'], got 'lora'"),
]


@pytest.mark.parametrize("make,error,message", CASES, ids=[c[2][:40] for c in CASES])
def test_constructor_errors(make, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make()


@pytest.fixture
def layer():
    return TuckerAttention(32, 4, (2, 8, 8), causal=True)


def test_wrong_last_dimension(layer):
    with pytest.raises(ValueError, match=re.escape("x must have shape (batch, seq, d_model=32), got (2, 5, 31)")):
        layer(torch.randn(2, 5, 31))


def test_wrong_rank_of_input(layer):
    with pytest.raises(ValueError, match=re.escape("x must have shape (batch, seq, d_model=32), got (5, 32)")):
        layer(torch.randn(5, 32))


def test_not_a_tensor(layer):
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[0.0] * 32])


def test_chunk_overflowing_the_cache(layer):
    cache = layer.make_cache(2, 6)
    layer(torch.randn(2, 4, 32), cache=cache)
    with pytest.raises(ValueError, match=re.escape("chunk of 3 tokens overflows the cache: 4 cached + 3 > max_seq_len=6")):
        layer(torch.randn(2, 3, 32), cache=cache)
    assert cache.length == 4                       # nothing was written
    cache.reset()
    assert layer(torch.randn(2, 6, 32), cache=cache).shape == (2, 6, 32)


def test_cache_batch_mismatch(layer):
    with pytest.raises(ValueError, match=re.escape("x has batch size 3 but the cache was made for batch_size=2")):
        layer(torch.randn(3, 1, 32), cache=layer.make_cache(2, 6))


def test_cache_dtype_mismatch(layer):
    with pytest.raises(ValueError, match="cache holds torch.float64 but the layer produced torch.float32"):
        layer(torch.randn(2, 1, 32), cache=layer.make_cache(2, 6, dtype=torch.float64))


def test_cache_from_another_layer(layer):
    other = MultiHeadAttention(32, 4, causal=True)
    with pytest.raises(ValueError, match="cache does not fit this layer"):
        layer(torch.randn(2, 1, 32), cache=other.make_cache(2, 6))


def test_cache_needs_a_causal_layer():
    layer = TuckerAttention(32, 4, (2, 8, 8))
    with pytest.raises(ValueError, match=re.escape("cache decoding needs a causal layer (construct it with causal=True)")):
        layer(torch.randn(1, 1, 32), cache=layer.make_cache(1, 4))


def test_bad_masks(layer):
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="attn_mask must be a bool tensor"):
        layer(x, attn_mask=torch.ones(2, 1, 1, 5))
    with pytest.raises(ValueError, match=re.escape("attn_mask must have shape (1 or 2, 1 or 4, 1 or 5, 5), got (2, 5)")):
        layer(x, attn_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=re.escape("got (3, 1, 1, 5)")):
        layer(x, attn_mask=torch.ones(3, 1, 1, 5, dtype=torch.bool))


def test_bad_positions(layer):
    with pytest.raises(ValueError, match=re.escape("positions must have shape (seq,) = (5,), got (4,)")):
        layer(torch.randn(2, 5, 32), positions=torch.arange(4))


def test_bad_cache_sizes(layer):
    with pytest.raises(ValueError, match="max_seq_len must be an integer >= 1, got 0"):
        layer.make_cache(1, 0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        layer.make_cache(0, 4)
