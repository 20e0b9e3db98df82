"""Every layer against the float64 reference; decoding, causality, RoPE, gradients."""

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYER_CONFIGS, randomize_
from reference import reference_forward

from tucker_attention import make_attention
from tucker_attention.layers import sdpa

D_MODEL, N_HEADS = 32, 4
ROPE_CONFIGS = [(m, kw) for m, kw in LAYER_CONFIGS if kw.get("rope")]


def build(config, **extra):
    method, kwargs = config
    torch.manual_seed(0)
    return randomize_(make_attention(method, D_MODEL, N_HEADS, **kwargs, **extra))


@pytest.mark.parametrize("causal", [False, True])
def test_matches_explicit_softmax_reference(config, causal):
    layer = build(config, causal=causal).double()
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-10, rtol=1e-10)


def test_padding_mask_matches_reference(config):
    layer = build(config).double()
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[1, ..., 5:] = False                                     # second sequence: last two tokens padded
    out = layer(x, attn_mask=keep)
    for b in range(2):
        ref = reference_forward(layer, x[b:b + 1], mask=keep[b, 0])
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-10, rtol=1e-10)


def test_shapes_and_gradients(config):
    layer = build(config, causal=True)
    x = torch.randn(3, 10, D_MODEL, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 10, D_MODEL) and y.dtype == torch.float32
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_causality(config):
    layer = build(config, causal=True)
    x = torch.randn(2, 12, D_MODEL)
    changed = x.clone()
    changed[:, 7] += torch.randn(2, D_MODEL)
    y, y_changed = layer(x), layer(changed)
    torch.testing.assert_close(y[:, :7], y_changed[:, :7], atol=0, rtol=0)
    assert (y[:, 7:] - y_changed[:, 7:]).abs().amax() > 1e-4


@pytest.mark.parametrize("chunks", [(12,), (5, 1, 1, 1, 1, 1, 1, 1), (4, 3, 1, 4)])
def test_decode_with_cache_equals_full_forward(config, chunks):
    layer = build(config, causal=True)
    x = torch.randn(2, 12, D_MODEL)
    full = layer(x)
    cache = layer.make_cache(2, 16)
    outs, start = [], 0
    for size in chunks:
        outs.append(layer(x[:, start:start + size], cache=cache))
        start += size
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope_config", ROPE_CONFIGS, ids=str)
def test_rope_depends_only_on_position_differences(rope_config):
    layer = build(rope_config, causal=True).double()
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    shifted = layer(x, positions=torch.arange(10) + 37)
    torch.testing.assert_close(shifted, layer(x), atol=1e-10, rtol=1e-10)
    # and the positions do matter: reversing them changes the output
    assert (layer(x, positions=torch.arange(10).flip(0)) - layer(x)).abs().amax() > 1e-6


def test_rope_shift_invariance_holds_for_decoding_too():
    layer = make_attention("tucker", D_MODEL, N_HEADS, ranks=(2, 16, 8), rope=True, shared_kv=True, causal=True)
    x = torch.randn(1, 6, D_MODEL)
    cache = layer.make_cache(1, 6)
    out = torch.cat([layer(x[:, :3], cache=cache, positions=torch.arange(100, 103))]
                    + [layer(x[:, t:t + 1], cache=cache, positions=torch.tensor([100 + t])) for t in range(3, 6)], 1)
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)


def test_gradcheck_float64(config):
    layer = build(config, causal=True).double()
    x = torch.randn(1, 4, D_MODEL, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,), eps=1e-6, atol=1e-5)


def test_forward_calls_sdpa_exactly_once(config, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    layer = build(config, causal=True)
    layer(torch.randn(2, 5, D_MODEL))
    cache = layer.make_cache(2, 8)
    layer(torch.randn(2, 3, D_MODEL), cache=cache)
    layer(torch.randn(2, 1, D_MODEL), cache=cache)
    assert len(calls) == 3


def test_dropout_only_in_training():
    layer = make_attention("tucker", D_MODEL, N_HEADS, ranks=(2, 16, 8), dropout=0.5)
    x = torch.randn(2, 8, D_MODEL)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert (layer(x) - layer(x)).abs().amax() > 1e-4


def test_mla_latent_rope_fuses_the_query_side():
    """Cor. 3.2.1: with coupled RoPE the query path is c_q @ one matrix per head, then R(m)."""
    torch.manual_seed(0)
    layer = make_attention("mla", D_MODEL, N_HEADS, kv_rank=16, q_rank=12, rope="latent", causal=True).double()
    x = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    fused = layer.absorbed_query_weight()                                    # (q_rank, H, kv_rank)
    q = torch.einsum("btq,qhc->bhtc", layer.q_down(x), fused)
    c = layer.kv_down(x)[:, None]
    cos, sin = layer.rotary(torch.arange(6), torch.float64)
    from tucker_attention.layers.rope import apply_rope
    logits = layer.scale * apply_rope(q, cos, sin) @ apply_rope(c, cos, sin).transpose(-1, -2)
    logits = logits.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(logits, -1) @ c                                        # values: the latent itself
    w_uv = layer.v_up.weight.view(N_HEADS, layer.head_dim, 16)
    y = layer.o_proj(torch.einsum("bhtc,hdc->bthd", o, w_uv).reshape(1, 6, -1))
    torch.testing.assert_close(layer(x), y, atol=1e-10, rtol=1e-10)


def test_compiles_as_one_graph(config):
    """torch.compile captures forward and backward without graph breaks (fullgraph=True)."""
    torch._dynamo.reset()                     # each config compiles afresh (no recompile limit across tests)
    layer = build(config, causal=True)
    x = torch.randn(2, 6, D_MODEL)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, layer(x), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-6, rtol=1e-6)


def test_rope_tables_for_per_sequence_positions():
    """(B, T) positions give (B, 1, T, D) tables whose rows are the (T,) tables of each sequence."""
    from tucker_attention.layers import RotaryEmbedding

    rotary = RotaryEmbedding(8)
    positions = torch.tensor([[0, 1, 2], [5, 6, 9]])
    cos, sin = rotary(positions, torch.float64)
    assert cos.shape == sin.shape == (2, 1, 3, 8)
    for b in range(2):
        want_cos, want_sin = rotary(positions[b], torch.float64)
        torch.testing.assert_close(cos[b, 0], want_cos)
        torch.testing.assert_close(sin[b, 0], want_sin)
    with pytest.raises(ValueError, match=r"positions must have shape \(seq,\) or \(batch, seq\)"):
        rotary(torch.zeros(1, 2, 3, dtype=torch.long), torch.float32)
