"""RoPE-exact conversions (PAPER.md §5, layers.rope_pairs, tensors.rope), checked against independent references.

- The exact latent-RoPE Tucker form of every RoPE layer (head RoPE full / partial, custom frequencies,
  biases, 1..h key heads; MLA coupled and decoupled RoPE, shared or not) computes the source's outputs
  to 1e-12 in float64 against the explicit reference of tests/reference.py, and decodes with a cache.
- Truncating the RoPE key latent keeps RoPE: outputs depend on positions only through differences
  (shifting every position changes nothing), and the pairs kept carry their frequencies.
- The pair energies equal an independent formula: singular values of keys x queries per frequency.
- GQA merges and MLA conversions of head-RoPE layers are exact with every key / value kept.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_
from reference import reference_forward

from tucker_attention import TuckerAttention, make_attention
from tucker_attention.layers.rope_pairs import frequency_groups, pair_energies, pair_truncation
from tucker_attention.tensors import compress, input_transform, mha_to_gqa, mha_to_mla, to_tucker
from tucker_attention.tensors.rope import derotated, rope_mla

pytestmark = pytest.mark.usefixtures("one_thread")
D, H = 32, 4

SOURCES = [
    ("mha", {"rope": True}),
    ("mha", {"rope": True, "bias": True, "rope_base": 50.0}),
    ("gqa", {"n_kv_heads": 2, "rope": True, "bias": True}),
    ("gqa", {"n_kv_heads": 2, "rope": True, "rope_dim": 4, "bias": True}),           # partial RoPE
    ("mqa", {"rope": True, "rope_freqs": [1.0, 0.3, 0.3, 0.01]}),                     # custom, repeated
    ("gqa", {"n_kv_heads": 2, "head_dim": 12, "rope": True, "rope_dim": 8}),         # head_dim != d/h
    ("mla", {"kv_rank": 10, "rope": "latent", "bias": True, "down_bias": True}),
    ("mla", {"kv_rank": 10, "q_rank": 12, "rope": "latent", "shared_kv": False}),
    ("mla", {"kv_rank": 9, "rope": "decoupled", "rope_dim": 4, "bias": True, "down_bias": True}),  # odd latent
    ("mla", {"kv_rank": 10, "q_rank": 12, "rope": "decoupled", "shared_kv": False}),
]
IDS = [f"{m}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for m, kw in SOURCES]


def build(method, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(make_attention(method, D, H, causal=True, **kwargs)).double()


def inputs(seed=1, steps=9):
    return torch.randn(2, steps, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def decoded(layer, x, first=4):
    cache = layer.make_cache(x.shape[0], x.shape[1])
    steps = [layer(x[:, :first], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(first, x.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("method,kwargs", SOURCES, ids=IDS)
def test_exact_latent_form_reproduces_the_source(method, kwargs):
    layer = build(method, **kwargs)
    x = inputs()
    want = reference_forward(layer, x)                             # explicit rotations and softmax
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)
    tucker = to_tucker(layer)
    assert tucker.rope == "latent" and len(tucker.rope_freqs) == tucker.ranks[2] // 2
    torch.testing.assert_close(tucker(x), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(reference_forward(tucker, x), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(decoded(tucker, x), want, rtol=0, atol=1e-12)
    positions = torch.arange(9) + 11                                # RoPE: only differences matter
    torch.testing.assert_close(tucker(x, positions=positions), want, rtol=0, atol=1e-12)


def test_head_rope_latent_pairs_carry_each_heads_frequencies():
    layer = build("gqa", n_kv_heads=2, rope=True, rope_dim=4, rope_base=100.0)
    order, freqs = layer.latent_pairs()
    width = 2 * 8                                                   # 2 key heads of head_dim 8
    assert sorted(order.tolist()) == list(range(width))             # a permutation of the stacked key columns
    firsts, seconds = order[:width // 2], order[width // 2:]
    inv = layer.rotary.inv_freq
    for p, (a, b) in enumerate(zip(firsts.tolist(), seconds.tolist())):
        head, slot = divmod(a, 8)
        assert b // 8 == head                                       # a pair stays within its head
        if slot < 2:                                                # rotated pair (slot, slot + rope_dim / 2)
            assert b % 8 == slot + 2 and freqs[p] == inv[slot]
        else:                                                       # the unrotated dims pair up at frequency 0
            assert freqs[p] == 0 and b % 8 >= 4


def test_rope_freqs_round_trip_through_config_and_json():
    layer = to_tucker(build("mqa", rope=True, rope_freqs=[1.0, 0.3, 0.3, 0.01]))
    config = json.loads(json.dumps(layer.config()))
    rebuilt = make_attention(**config)
    rebuilt.load_state_dict(layer.state_dict())
    x = inputs()
    torch.testing.assert_close(rebuilt.double()(x), layer(x), rtol=0, atol=0)
    assert rebuilt.rope_freqs == layer.rope_freqs
    assert "rope_freqs" not in make_attention("tucker", D, H, ranks=(2, 8, 4), rope=True).config()   # default
    with pytest.raises(ValueError, match="rope_freqs sets the frequencies of RoPE, but rope=None"):
        make_attention("tucker", D, H, ranks=(2, 8, 4), rope_freqs=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"inv_freq must be a finite tensor of shape \(dim/2,\) = \(2,\)"):
        make_attention("tucker", D, H, ranks=(2, 8, 4), rope=True, rope_freqs=[1.0, 2.0, 3.0])


@pytest.mark.parametrize("shared_kv", [False, True])
def test_key_bias_is_rotated_with_the_keys(shared_kv):
    layer = randomize_(TuckerAttention(D, H, (3, 12, 8), shared_kv=shared_kv, rope=True, bias=True,
                                       causal=True)).double()
    assert layer.k_bias is not None and layer.k_bias.shape == (8,)
    x = inputs()
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(decoded(layer, x), layer(x), rtol=0, atol=1e-12)
    assert TuckerAttention(D, H, (3, 12, 8), bias=True).k_bias is None    # without RoPE it would cancel


# -- the pair truncation -----------------------------------------------------------------------------

def test_pair_energies_equal_singular_values_of_keys_times_queries():
    """Per frequency group: energies = squared singular values of (complex keys) x conj(complex queries)."""
    gen = torch.Generator().manual_seed(0)
    d, freqs = 12, torch.tensor([0.5, 0.1, 0.5, 0.0, 0.1, 0.5], dtype=torch.float64)
    r = 2 * freqs.numel()
    U = torch.randn(d, r, generator=gen, dtype=torch.float64)
    Y = torch.randn(r, 7, generator=gen, dtype=torch.float64)
    want = []
    for freq, pairs in frequency_groups(freqs):
        cols = torch.cat([pairs, pairs + r // 2])
        if freq == 0:                                               # unrotated: a real PCA, two at a time
            s = torch.linalg.svdvals(U[:, cols] @ Y[cols]).square()[:2 * len(pairs)]   # rank <= 2k
            want += (s[0::2] + s[1::2]).tolist()
        else:
            keys = torch.complex(U[:, pairs], U[:, pairs + r // 2])
            queries = torch.complex(Y[pairs], Y[pairs + r // 2])
            want += torch.linalg.svdvals(keys @ queries.conj()).square()[:len(pairs)].tolist()   # rank <= k
    torch.testing.assert_close(pair_energies(U, Y, freqs), torch.tensor(sorted(want, reverse=True),
                                                                        dtype=torch.float64))
    factor, step, key_step, kept = pair_truncation(U, Y, freqs, 3)
    assert factor.shape == (d, 6) and step.shape == (6, r) and kept.shape == (3,)
    assert set(kept.tolist()) <= set(freqs.tolist())


@pytest.mark.parametrize("method,kwargs", SOURCES, ids=IDS)
def test_truncated_key_latent_keeps_rope(method, kwargs):
    """Fewer pairs: every output still depends on positions only through their differences."""
    tucker = to_tucker(build(method, **kwargs))
    r1, r2, r3 = tucker.ranks
    small = tucker.truncated((r1, r2, r3 - 4), tucker.value_ranks if not tucker.shared_kv else
                             (*tucker.value_ranks[:2], r3 - 4))
    assert small.ranks[2] == r3 - 4 and len(small.rope_freqs) == (r3 - 4) // 2
    assert set(small.rope_freqs) <= set(tucker.rope_freqs)         # each pair keeps a source frequency
    x = inputs()
    torch.testing.assert_close(small(x, positions=torch.arange(9) + 37), small(x), rtol=0, atol=1e-11)
    torch.testing.assert_close(small(x), reference_forward(small, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(decoded(small, x), small(x), rtol=0, atol=1e-12)
    assert (small(x) - tucker(x)).abs().max() > 1e-6                # it did drop something


def test_truncation_keeps_the_pairs_of_largest_energy():
    tucker = to_tucker(build("gqa", n_kv_heads=2, rope=True))
    x = inputs(steps=24)
    energies = tucker.pair_spectrum()
    errors = []
    for pairs in range(1, tucker.ranks[2] // 2 + 1):
        small = tucker.truncated((*tucker.ranks[:2], 2 * pairs), tucker.value_ranks)
        errors.append(float((small(x) - tucker(x)).norm()))
    assert errors[-1] < 1e-10                                       # every pair kept: exact
    assert errors[0] > errors[len(errors) // 2] > errors[-1]        # more pairs, closer
    assert energies.shape == (tucker.ranks[2] // 2,) and (energies[:-1] >= energies[1:]).all()


def test_derotated_stops_the_lowest_frequencies():
    tucker = to_tucker(build("gqa", n_kv_heads=2, rope=True, rope_base=100.0))
    distinct = sorted(set(tucker.rope_freqs))                       # 4 frequencies, each in 2 heads
    half = derotated(tucker, 0.5)
    assert sorted(set(half.rope_freqs)) == [0.0] + distinct[2:] and tucker.rope_freqs != half.rope_freqs
    assert derotated(tucker, 0.0) is tucker
    x = inputs()
    none = derotated(tucker, 1.0)                                   # nothing rotates: offset-0 logits everywhere
    assert set(none.rope_freqs) == {0.0}
    torch.testing.assert_close(none(x, positions=torch.arange(9) * 5), none(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"nope_fraction must be a number in \[0, 1\]"):
        derotated(tucker, 1.5)


# -- GQA and MLA of head-RoPE layers -------------------------------------------------------------------

HEAD_SOURCES = [(m, kw) for m, kw in SOURCES if m != "mla"]
HEAD_IDS = [i for i, (m, _) in zip(IDS, SOURCES) if m != "mla"]


@pytest.mark.parametrize("method,kwargs", HEAD_SOURCES, ids=HEAD_IDS)
def test_gqa_and_mla_keep_head_rope(method, kwargs):
    layer = build(method, **kwargs)
    x = inputs()
    want = reference_forward(layer, x)
    n_kv = layer.cache_spec()["k"][0]
    same = mha_to_gqa(layer, n_kv)
    assert same.rope == "head" and same.rope_freqs == tuple(layer.rotary.inv_freq.tolist())
    torch.testing.assert_close(same(x), want, rtol=0, atol=1e-12)
    full = mha_to_mla(layer, None)                                  # every key pair and value direction
    assert full.rope == "latent" and full.kv_rank == 2 * n_kv * layer.config()["head_dim"]
    torch.testing.assert_close(full(x), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(decoded(full, x), want, rtol=0, atol=1e-12)
    for small in (mha_to_gqa(layer, 1), rope_mla(layer, 8, q_rank=12)):
        torch.testing.assert_close(small(x, positions=torch.arange(9) + 5), small(x), rtol=0, atol=1e-11)


def test_merging_equal_key_heads_loses_nothing():
    layer = build("gqa", n_kv_heads=2, rope=True, rope_dim=4)
    with torch.no_grad():                                           # both key and value heads equal
        layer.k_proj.weight[8:] = layer.k_proj.weight[:8]
        layer.v_proj.weight[8:] = layer.v_proj.weight[:8]
    x = inputs()
    torch.testing.assert_close(mha_to_gqa(layer, 1)(x), layer(x), rtol=0, atol=1e-11)


def test_compress_of_a_rope_layer_is_the_exact_form_truncated():
    layer = build("gqa", n_kv_heads=2, rope=True, bias=True)
    x = inputs()
    exact = compress(layer, None)
    torch.testing.assert_close(exact(x), layer(x), rtol=0, atol=1e-12)
    small = compress(layer, (3, 20, 8), (4, 24, 10))
    assert (small.ranks, small.value_ranks, small.rope) == ((3, 20, 8), (4, 24, 10), "latent")
    legacy = compress(layer, (3, 20, 8), ignore_rope=True)          # offset-0 weights: no RoPE at all
    assert legacy.rope is None


def test_value_inputs_take_their_own_matrix():
    layer = build("gqa", n_kv_heads=2, rope=True)
    assert layer.value_inputs() == ("v_proj.weight",) and to_tucker(layer).value_inputs() == ("U3_tilde",)
    gen = torch.Generator().manual_seed(3)
    S, V = (torch.randn(D, D, generator=gen, dtype=torch.float64) for _ in range(2))
    moved = input_transform(layer, S, V)
    x = inputs()
    explicit = make_attention(**layer.config()).double()
    explicit.load_state_dict(layer.state_dict())
    with torch.no_grad():
        explicit.q_proj.weight.copy_(layer.q_proj.weight @ S.T)
        explicit.k_proj.weight.copy_(layer.k_proj.weight @ S.T)
        explicit.v_proj.weight.copy_(layer.v_proj.weight @ V.T)
    torch.testing.assert_close(moved(x), explicit(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"value_matrix must be \(d_model, d_model\) = \(32, 32\)"):
        input_transform(layer, S, V[:4])


@pytest.mark.parametrize("kwargs", [{"rope": True, "bias": True}, {"rope": True, "rope_dim": 4}, {"bias": True}],
                         ids=["rope-bias", "partial", "no-rope"])
def test_one_key_heads_q_k_norms_become_the_latents(kwargs):
    layer = build("mqa", qk_norm=True, norm_eps=1e-3, **kwargs)
    assert layer.exact_with_norms() and not build("gqa", n_kv_heads=2, qk_norm=True).exact_with_norms()
    x = inputs()
    tucker = to_tucker(layer)
    assert tucker.q_norm is not None and tucker.nonlinearity() is not None and tucker.norm_eps == 1e-3
    torch.testing.assert_close(tucker(x), layer(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(decoded(tucker, x), layer(x), rtol=0, atol=1e-12)
    rebuilt = make_attention(**json.loads(json.dumps(tucker.config()))).double()
    rebuilt.load_state_dict(tucker.state_dict())
    torch.testing.assert_close(rebuilt(x), tucker(x), rtol=0, atol=0)
    r1, r2, r3 = tucker.ranks
    with pytest.raises(ValueError, match=r"ranks\[2\] \(r3\) must stay 8: the q/k norms"):
        tucker.truncated((r1, r2, r3 - 2), tucker.value_ranks)
    small = tucker.truncated((2, 12, r3), (3, 12, 4))              # queries, heads, values: free
    assert small.q_norm is not None and torch.equal(small.k_norm.weight, tucker.k_norm.weight)
    assert torch.isfinite(small(x)).all()
    with pytest.raises(ValueError, match="not linear in x"):
        tucker.tensor_view()
    with pytest.raises(ValueError, match="use shared_kv=False with qk_norm=True"):
        TuckerAttention(D, H, (2, 8, 8), shared_kv=True, qk_norm=True)
