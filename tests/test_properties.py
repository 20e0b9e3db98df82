"""Property-based tests over random small shapes and ranks (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_forward

from tucker_attention import GroupedQueryAttention, MultiHeadLatentAttention, TuckerAttention

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def tucker_layers(draw):
    n_heads = draw(st.integers(1, 4))
    d_model = n_heads * draw(st.integers(1, 6)) * 2
    rope = draw(st.booleans())
    r1 = draw(st.integers(1, n_heads))
    r2 = draw(st.integers(1, d_model))
    r3 = draw(st.integers(1, d_model // 2)) * 2 if rope else draw(st.integers(1, d_model))
    shared_kv = draw(st.booleans())
    value_ranks = (draw(st.integers(1, n_heads)), draw(st.integers(1, d_model)),
                   r3 if shared_kv else draw(st.integers(1, d_model)))
    return TuckerAttention(d_model, n_heads, (r1, r2, r3), value_ranks=value_ranks, shared_kv=shared_kv,
                           rope=rope, causal=draw(st.booleans()), bias=draw(st.booleans()))


@st.composite
def other_layers(draw):
    n_heads = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 4)) * 2
    d_model = n_heads * head_dim
    causal = draw(st.booleans())
    if draw(st.booleans()):
        n_kv = draw(st.sampled_from([g for g in range(1, n_heads + 1) if n_heads % g == 0]))
        return GroupedQueryAttention(d_model, n_heads, n_kv, rope=draw(st.booleans()), causal=causal)
    rope = draw(st.sampled_from([None, "decoupled", "latent"]))
    kv_rank = draw(st.integers(1, d_model // 2)) * 2 if rope == "latent" else draw(st.integers(1, d_model))
    return MultiHeadLatentAttention(d_model, n_heads, kv_rank, q_rank=draw(st.none() | st.integers(1, d_model)),
                                    rope=rope, shared_kv=draw(st.booleans()), causal=causal)


@SETTINGS
@given(layer=tucker_layers() | other_layers(), batch=st.integers(1, 3), seq=st.integers(1, 7), seed=st.integers(0, 99))
def test_any_layer_matches_reference(layer, batch, seq, seed):
    torch.manual_seed(seed)
    layer = layer.double()
    x = torch.randn(batch, seq, layer.d_model, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-9, rtol=1e-9)


@SETTINGS
@given(layer=tucker_layers() | other_layers(), seq=st.integers(2, 9), split=st.integers(1, 8))
def test_any_causal_layer_decodes_like_its_full_forward(layer, seq, split):
    layer.causal = True
    x = torch.randn(2, seq, layer.d_model)
    split = min(split, seq - 1)
    cache = layer.make_cache(2, seq)
    steps = [layer(x[:, :split], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(split, seq)]
    torch.testing.assert_close(torch.cat(steps, 1), layer(x), atol=1e-5, rtol=1e-5)
