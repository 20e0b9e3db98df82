"""Rank truncation of Tucker layers (TuckerAttention.mode_spectra / .truncated) and the budget
allocation for it (tensors.allocate_ranks), against dense float64 tensors and explicit formulas."""

import copy
import itertools
import math

import pytest
import torch
from conftest import randomize_
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_forward

from tucker_attention import TuckerAttention, make_attention
from tucker_attention.tensors import allocate_ranks, compress, layer_cost

OPTIONS = list(itertools.product([None, "latent"], [False, True], [False, True]))   # rope, bias, shared_kv
OPTION_IDS = [f"rope={r}-bias={b}-shared_kv={s}" for r, b, s in OPTIONS]


def _layer(rope=None, bias=False, shared_kv=False, causal=False, d=24, heads=4, ranks=(3, 10, 6),
           value_ranks=(4, 8, 6), seed=0):
    torch.manual_seed(seed)
    return randomize_(TuckerAttention(d, heads, ranks, value_ranks=value_ranks, rope=rope, bias=bias,
                                      shared_kv=shared_kv, causal=causal))


def _dense(layer):
    """(W, W_tilde), each (H, d, d) float64, from the parameters (PAPER.md §2)."""
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    U3t = p.get("U3_tilde", p["U3"])
    W = torch.einsum("ic,cab,pa,qb->ipq", p["U1"], p["core"], p["U2"], p["U3"])
    Wt = torch.einsum("ic,cab,pa,qb->ipq", p["U1_tilde"], p["core_tilde"], p["U2_tilde"], U3t)
    return W, Wt


def _unfold(T, mode):                                   # mode 0-based
    return T.movedim(mode, 0).reshape(T.shape[mode], -1)


def _times(T, mode, M):
    return torch.tensordot(M, T, dims=([1], [mode])).movedim(0, mode)


def _projector(matrix, rank):
    """Orthogonal projection on the leading ``rank`` left singular vectors (dense SVD)."""
    U = torch.linalg.svd(matrix, full_matrices=False).U[:, :rank]
    return U @ U.T


def _fixed(layer):
    rope = layer.rope is not None
    return (False, False, rope), (False, False, rope and layer.shared_kv)


def _dense_projectors(layer, ranks, value_ranks):
    """Pi_k per side and mode from dense SVDs of the unfoldings (identity for fixed modes; the joint
    mode-3 unfolding with a shared latent and no RoPE)."""
    W, Wt = _dense(layer)
    out = []
    for T, new, fixed in zip((W, Wt), (ranks, value_ranks), _fixed(layer)):
        out.append([torch.eye(T.shape[m], dtype=torch.float64) if fixed[m] else _projector(_unfold(T, m), new[m])
                    for m in range(3)])
    if layer.shared_kv and layer.rope is None:
        out[0][2] = out[1][2] = _projector(torch.cat([_unfold(W, 2), _unfold(Wt, 2)], 1), ranks[2])
    return out


def _project(T, projectors):
    for m, Pi in enumerate(projectors):
        T = _times(T, m, Pi)
    return T


# -- mode_spectra -----------------------------------------------------------------------------

@pytest.mark.parametrize("rope,bias,shared_kv", OPTIONS, ids=OPTION_IDS)
def test_spectra_equal_singular_values_of_dense_unfoldings(rope, bias, shared_kv):
    value_ranks = (2, 12, 6) if shared_kv else (2, 12, 5)                # r2~ = 12 > r1~ r3~: zeros in s2~
    layer = _layer(rope, bias, shared_kv, ranks=(3, 10, 6), value_ranks=value_ranks)
    spectra = layer.mode_spectra()
    W, Wt = _dense(layer)
    fixed = _fixed(layer)
    for name, T, current, fix in zip(("ranks", "value_ranks"), (W, Wt), (layer.ranks, layer.value_ranks), fixed):
        for m in range(3):
            s = spectra[name][m]
            if fix[m]:
                assert s is None
                continue
            dense = torch.linalg.svdvals(_unfold(T, m))
            if m == 2 and shared_kv and rope is None:
                dense = torch.linalg.svdvals(torch.cat([_unfold(W, 2), _unfold(Wt, 2)], 1))
            assert s.dtype == torch.float64 and s.shape == (current[m],)
            assert torch.all(s[:-1] >= s[1:])
            scale = float(dense[0])
            torch.testing.assert_close(s, dense[:current[m]], atol=1e-7 * scale, rtol=1e-9)
            assert float(dense[current[m]:].abs().sum()) < 1e-9 * scale    # the rest are zero
    nonzero = value_ranks[0] * value_ranks[2]
    if nonzero < 12:
        assert float(spectra["value_ranks"][1][nonzero:].max()) < 1e-7 * float(spectra["value_ranks"][1][0])


def test_shared_latent_spectrum_holds_both_energies():
    layer = _layer(shared_kv=True)
    spectra = layer.mode_spectra()
    W, Wt = _dense(layer)
    assert spectra["ranks"][2] is spectra["value_ranks"][2]
    assert float(spectra["ranks"][2].square().sum()) == pytest.approx(float(W.square().sum() + Wt.square().sum()),
                                                                     rel=1e-10)


# -- truncated: exactness and the function it computes ----------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rope,bias,shared_kv", OPTIONS, ids=OPTION_IDS)
def test_truncation_at_current_ranks_is_exact(rope, bias, shared_kv, causal):
    layer = _layer(rope, bias, shared_kv, causal)
    new = layer.truncated(layer.ranks, layer.value_ranks)
    x = torch.randn(2, 7, layer.d_model)
    want = layer(x)
    torch.testing.assert_close(new(x), want, atol=2e-6 * float(want.detach().abs().max()), rtol=1e-5)
    assert new.config() == layer.config()
    assert all(p.dtype == torch.float32 for p in new.parameters())
    assert not {p.data_ptr() for p in new.parameters()} & {p.data_ptr() for p in layer.parameters()}
    if rope is not None:                                         # the rotated latent is left bit for bit
        assert torch.equal(new.U3, layer.U3)
        assert bias is False or torch.equal(new.q_bias, layer.q_bias)


@pytest.mark.parametrize("rope,bias,shared_kv", OPTIONS, ids=OPTION_IDS)
def test_truncated_layer_is_the_projected_original(rope, bias, shared_kv):
    """The truncated layer computes the original's function with every factor projected, U_k <- Pi_k U_k
    (Pi_k from dense SVDs of the unfoldings; RoPE, biases and the shared latent included)."""
    layer = _layer(rope, bias, shared_kv, causal=True).double()
    ranks, value_ranks = (2, 7, 6 if rope else 4), (3, 5, 6 if rope and shared_kv else 4 if shared_kv else 3)
    new = layer.truncated(ranks, value_ranks)
    assert (new.ranks, new.value_ranks) == (ranks, value_ranks)
    (P1, P2, P3), (T1, T2, T3) = _dense_projectors(layer, ranks, value_ranks)
    projected = copy.deepcopy(layer)
    with torch.no_grad():
        for name, Pi in (("U1", P1), ("U2", P2), ("U3", P3), ("U1_tilde", T1), ("U2_tilde", T2)):
            projected.get_parameter(name).copy_(Pi @ projected.get_parameter(name))
        if not shared_kv:
            projected.U3_tilde.copy_(T3 @ projected.U3_tilde)
    x = torch.randn(2, 6, layer.d_model, dtype=torch.float64)
    torch.testing.assert_close(new(x), reference_forward(projected, x), atol=1e-10, rtol=1e-9)
    W, Wt = _dense(layer)
    W_hat, Wt_hat = _dense(new)
    torch.testing.assert_close(W_hat, _project(W, (P1, P2, P3)), atol=1e-10, rtol=0)
    torch.testing.assert_close(Wt_hat, _project(Wt, (T1, T2, T3)), atol=1e-10, rtol=0)
    if bias:                                                     # the key bias U3 q_bias_i, projected by Pi3
        old, now = layer.tensor_view().key_bias, new.tensor_view().key_bias
        torch.testing.assert_close(now, old @ P3, atol=1e-10, rtol=0)
        assert torch.equal(new.out_bias, layer.out_bias)
    if rope is not None:
        assert torch.equal(new.U3, layer.U3)


def test_truncated_keeps_scale_mode_dtype_and_draws_no_random_numbers():
    layer = _layer(rope="latent", causal=True, ranks=(3, 10, 8)).double().eval()
    layer.rotary.set_frequencies(torch.linspace(1.0, 0.01, 4))              # custom (e.g. scaled) RoPE
    state = torch.random.get_rng_state()
    new = layer.truncated((2, 6, 8), (3, 5, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not new.training and all(p.dtype == torch.float64 for p in new.parameters())
    assert new.rotary.signature == layer.rotary.signature
    no_rope = _layer(ranks=(3, 10, 8))
    small = no_rope.truncated((3, 10, 4), (4, 8, 6))
    assert small.scale == no_rope.scale == 1 / math.sqrt(8)                 # not 1/sqrt(4)
    assert small.config()["scale"] == 1 / math.sqrt(8) and small.config()["ranks"] == (3, 10, 4)
    rebuilt = make_attention(**small.config())
    rebuilt.load_state_dict(small.state_dict())
    x = torch.randn(1, 5, 24)
    torch.testing.assert_close(rebuilt(x), small(x), atol=0, rtol=0)


# -- truncation error: optimal per mode -------------------------------------------------------

def _rel_error(T, T_hat):
    return float((T - T_hat).norm() / T.norm())


@pytest.mark.parametrize("side,mode,keep", [(0, 0, 2), (0, 1, 6), (0, 2, 3), (1, 0, 2), (1, 1, 3), (1, 2, 2)])
def test_single_mode_truncation_error_is_the_discarded_energy_and_optimal(side, mode, keep):
    layer = _layer(bias=True)
    spectra = layer.mode_spectra()
    new_ranks = [list(layer.ranks), list(layer.value_ranks)]
    new_ranks[side][mode] = keep
    new = layer.truncated(*map(tuple, new_ranks))
    T, T_hat = _dense(layer)[side], _dense(new)[side]
    s = spectra[("ranks", "value_ranks")[side]][mode]
    want = (1 - float(s[:keep].square().sum() / s.square().sum())) ** 0.5
    assert _rel_error(T, T_hat) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert _rel_error(T, T_hat) > 1e-3                                       # something was dropped
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):                                                      # any other basis of that size loses more
        V = torch.linalg.qr(torch.randn(T.shape[mode], keep, generator=generator, dtype=torch.float64)).Q
        assert _rel_error(T, T_hat) <= _rel_error(T, _times(T, mode, V @ V.T)) + 1e-9
    reference = compress(layer, *map(tuple, new_ranks))                     # the tensors package's HOSVD
    assert _rel_error(T, T_hat) == pytest.approx(_rel_error(T, _dense(reference)[side]), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("rope,shared_kv", [(None, False), ("latent", False), (None, True)])
def test_multi_mode_error_between_hosvd_bounds(rope, shared_kv):
    layer = _layer(rope, shared_kv=shared_kv, d=32, ranks=(4, 12, 8), value_ranks=(3, 10, 8))
    spectra = layer.mode_spectra()
    ranks, value_ranks = (2, 6, 8 if rope else 5), (2, 4, 5)
    new = layer.truncated(ranks, value_ranks)
    for name, T, T_hat, new_r in zip(("ranks", "value_ranks"), _dense(layer), _dense(new), (ranks, value_ranks)):
        if shared_kv:
            continue                                                        # its mode 3 is joint, below
        lost = [0.0 if s is None else float(s[r:].square().sum() / s.square().sum())
                for s, r in zip(spectra[name], new_r)]
        err2 = _rel_error(T, T_hat) ** 2
        assert max(lost) - 1e-9 <= err2 <= sum(lost) + 1e-9
        assert err2 > max(lost) + 1e-6                                      # and truly more than one mode's loss
    if shared_kv:                                                           # one basis for both modes 3
        single = layer.truncated(layer.ranks[:2] + (5,), layer.value_ranks[:2] + (5,))
        (W, Wt), (W_hat, Wt_hat) = _dense(layer), _dense(single)
        s = spectra["ranks"][2]
        lost = float(s[5:].square().sum())
        assert float((W - W_hat).square().sum() + (Wt - Wt_hat).square().sum()) == pytest.approx(lost, rel=1e-6)


# -- truncated: argument checks ---------------------------------------------------------------

def test_truncated_refuses_odd_rope_larger_and_untied_ranks():
    rope = _layer(rope="latent")
    with pytest.raises(ValueError, match=r"ranks\[2\] \(r3\) must be even: latent RoPE rotates pairs"):
        rope.truncated((3, 10, 5), rope.value_ranks)
    rope.truncated((3, 10, 4), rope.value_ranks)                            # by whole pairs
    rope.truncated((3, 10, 6), (4, 8, 3))                                   # values are not rotated: free
    shared_rope = _layer(rope="latent", shared_kv=True)
    with pytest.raises(ValueError, match=r"value_ranks\[2\] must equal ranks\[2\]=6"):
        shared_rope.truncated((3, 10, 6), (4, 8, 4))
    layer = _layer()
    with pytest.raises(ValueError, match=r"ranks\[1\] \(r2\) must be in \[1, 10\].*got 11"):
        layer.truncated((3, 11, 6), layer.value_ranks)
    with pytest.raises(ValueError, match=r"value_ranks\[0\] \(r1~\) must be in \[1, 4\]"):
        layer.truncated(layer.ranks, (5, 8, 6))
    with pytest.raises(ValueError, match=r"value_ranks\[2\] must equal ranks\[2\]=4"):
        _layer(shared_kv=True).truncated((3, 10, 4), (4, 8, 6))
    with pytest.raises(ValueError, match=r"ranks\[0\] \(r1\)"):
        layer.truncated((0, 10, 6), layer.value_ranks)
    with pytest.raises(TypeError, match="ranks"):
        layer.truncated((3.0, 10, 6), layer.value_ranks)


# -- layer_cost -------------------------------------------------------------------------------

@pytest.mark.parametrize("rope,bias,shared_kv", OPTIONS, ids=OPTION_IDS)
def test_layer_cost_counts_the_truncated_layer(rope, bias, shared_kv):
    layer = _layer(rope, bias, shared_kv)
    ranks, value_ranks = (2, 7, 6), (3, 5, 6 if shared_kv else 2)
    new = layer.truncated(ranks, value_ranks)
    assert layer_cost(layer, ranks, value_ranks) == (sum(p.numel() for p in new.parameters()),
                                                     sum(h * w for h, w in new.cache_spec().values()))


# -- allocate_ranks ---------------------------------------------------------------------------

def _params(layer, r, v):
    """Parameter count from the factor shapes (PAPER.md §2), written out independently of layer_cost."""
    h, d = layer.n_heads, layer.d_model
    shapes = [(r[0], r[1], r[2]), (h, r[0]), (d, r[1]), (d, r[2]), (v[0], v[1], v[2]), (h, v[0]), (d, v[1])]
    shapes += [] if layer.shared_kv else [(d, v[2])]
    shapes += [(h, r[2]), (d,)] if layer.q_bias is not None else []
    shapes += [(r[2],)] if layer.k_bias is not None else []               # the latent key bias under RoPE
    return sum(torch.Size(s).numel() for s in shapes)


def _kv(layer, r, v):
    return r[2] if layer.shared_kv else r[2] + v[2]


def _chains(layer):
    """Relative energies per (side, mode) as 6 lists (None: fixed, or tied to the joint mode 3 at index 2)."""
    sp = layer.mode_spectra()
    norms = [float(sp[n][0].square().sum()) for n in ("ranks", "value_ranks")]
    out = [None if s is None else (s.square() / norm).tolist() for n, norm in zip(("ranks", "value_ranks"), norms)
           for s in sp[n]]
    if layer.shared_kv and layer.rope is None:
        out[2], out[5] = (2 * sp["ranks"][2].square() / sum(norms)).tolist(), None
    return out


def _kept_energy(layers, plan):
    return sum(sum(chain[:r]) for layer, (ranks, value_ranks) in zip(layers, plan)
               for chain, r in zip(_chains(layer), ranks + value_ranks) if chain is not None)


def _increments(layer, chains, r, kind):
    """(mode index, new state) of every single increment allowed from state r (6 ranks)."""
    current = layer.ranks + layer.value_ranks
    for k, chain in enumerate(chains):
        if chain is None or r[k] >= current[k] or (kind == "kv" and k % 3 != 2) or chain[r[k]] <= 1e-12:
            continue
        s = list(r)
        s[k] += 1
        if k == 2 and layer.shared_kv:
            s[5] += 1
        yield k, s


def _lowest(layer, kind):
    """The smallest allowed state (6 ranks): 1 per free mode (kv: modes 1, 2 at current), fixed modes at current."""
    now, fixed = layer.ranks + layer.value_ranks, _fixed(layer)[0] + _fixed(layer)[1]
    return [now[k] if fixed[k] or (kind == "kv" and k % 3 != 2) else 1 for k in range(6)]


def _naive_greedy(layers, budget, kind):
    """The allocation rule by plain search: every step scans every increment from scratch."""
    cost = _params if kind == "params" else _kv
    chains = [_chains(layer) for layer in layers]
    state = [_lowest(layer, kind) for layer in layers]
    total = sum(cost(layer, s[:3], s[3:]) for layer, s in zip(layers, state))
    while True:
        best = None
        for i, layer in enumerate(layers):
            here = cost(layer, state[i][:3], state[i][3:])
            for k, s in _increments(layer, chains[i], state[i], kind):
                delta = cost(layer, s[:3], s[3:]) - here
                ratio = chains[i][k][state[i][k]] / delta
                if total + delta <= budget and (best is None or ratio > best[0]):
                    best = (ratio, i, s, delta)
        if best is None:
            return [(tuple(s[:3]), tuple(s[3:])) for s in state]
        _, i, state[i], delta = best
        total += delta


def _mixed_layers(seed=0, d=24):
    configs = [dict(), dict(rope="latent", bias=True), dict(shared_kv=True), dict(rope="latent", shared_kv=True),
               dict(bias=True, ranks=(4, 12, 8), value_ranks=(2, 9, 5))]
    return [_layer(d=d, seed=seed + i, **c) for i, c in enumerate(configs)]


def _check_plan(layers, plan, budget, kind):
    cost = _params if kind == "params" else _kv
    total = sum(cost(layer, r, v) for layer, (r, v) in zip(layers, plan))
    assert total <= budget
    for layer, (r, v) in zip(layers, plan):
        assert all(1 <= a <= b for a, b in zip(r + v, layer.ranks + layer.value_ranks))
        if layer.rope is not None:
            assert r[2] == layer.ranks[2]
        if layer.shared_kv:
            assert r[2] == v[2]
        if kind == "kv":
            assert (r[:2], v[:2]) == (layer.ranks[:2], layer.value_ranks[:2])
        for _, s in _increments(layer, _chains(layer), list(r + v), kind):    # maximal: no increment fits
            assert total - cost(layer, r, v) + cost(layer, s[:3], s[3:]) > budget
        layer.truncated(r, v)                                                  # a setting truncated() takes


@pytest.mark.parametrize("kind", ["params", "kv"])
def test_allocation_fits_is_maximal_and_is_the_greedy_rule(kind):
    layers = _mixed_layers()
    cost = _params if kind == "params" else _kv
    full = sum(cost(layer, layer.ranks, layer.value_ranks) for layer in layers)
    low = sum(cost(layer, s[:3], s[3:]) for layer in layers for s in [_lowest(layer, kind)])
    for fraction in (0.1, 0.4, 0.8):
        budget = low + int(fraction * (full - low))
        plan = allocate_ranks(layers, **{kind: budget})
        _check_plan(layers, plan, budget, kind)
        assert plan == _naive_greedy(layers, budget, kind)
    assert allocate_ranks(layers, **{kind: full}) == [(layer.ranks, layer.value_ranks) for layer in layers]


def test_allocation_prefers_concentrated_spectra():
    """A layer whose W holds its energy in few query directions gets a smaller r2 than a flat one."""
    steep, flat = _layer(seed=3, ranks=(4, 12, 8)), _layer(seed=3, ranks=(4, 12, 8))
    with torch.no_grad():
        steep.U2.copy_(torch.linalg.qr(steep.U2).Q * 0.5 ** torch.arange(12.0))
        flat.U2.copy_(torch.linalg.qr(flat.U2).Q)
    (r_steep, _), (r_flat, _) = allocate_ranks({"a": steep, "b": flat}, params=2000)
    assert r_steep[1] < r_flat[1]


def test_kept_energy_and_kv_ranks_grow_with_the_budget():
    layers = _mixed_layers(seed=5)
    low = sum(_params(layer, s[:3], s[3:]) for layer in layers for s in [_lowest(layer, "params")])
    energies = [_kept_energy(layers, allocate_ranks(layers, params=b)) for b in range(low + 200, 4000, 97)]
    assert all(a <= b + 1e-12 for a, b in zip(energies, energies[1:])) and energies[-1] > energies[0]
    plans = [allocate_ranks(layers, kv=b) for b in range(30, 60)]             # unit costs: nested settings
    for a, b in zip(plans, plans[1:]):
        assert all(x <= y for (r, v), (s, w) in zip(a, b) for x, y in zip(r + v, s + w))


def test_zero_energy_modes_stay_at_the_minimum():
    layer = _layer(ranks=(3, 10, 6), value_ranks=(2, 12, 3))     # unfold_2(W~) has rank <= 2 * 3 = 6 < 12
    (_, value_ranks), = allocate_ranks([layer], params=10 ** 6)
    assert value_ranks[1] <= 6 and value_ranks[0] == 2 and value_ranks[2] == 3


def test_allocation_errors():
    layers = _mixed_layers()
    minimum = sum(_params(layer, s[:3], s[3:]) for layer in layers for s in [_lowest(layer, "params")])
    with pytest.raises(ValueError, match=f"params budget {minimum - 1:,} is below the smallest setting's {minimum:,}"):
        allocate_ranks(layers, params=minimum - 1)
    allocate_ranks(layers, params=minimum)
    min_kv = sum(_kv(layer, s[:3], s[3:]) for layer in layers for s in [_lowest(layer, "kv")])
    with pytest.raises(ValueError, match=f"kv budget {min_kv - 1} is below the smallest setting's {min_kv}"):
        allocate_ranks(layers, kv=min_kv - 1)
    with pytest.raises(ValueError, match="params budget 10 is below"):          # both budgets must hold
        allocate_ranks(layers, params=10, kv=10 ** 6)
    with pytest.raises(ValueError, match="give a budget"):
        allocate_ranks(layers)
    with pytest.raises(ValueError, match=r"params must be a positive int .*got 0.5"):
        allocate_ranks(layers, params=0.5)
    with pytest.raises(TypeError, match=r"layers\[1\] must be a layer with mode_spectra\(\) and truncated\(\)"
                                        r".*MultiHeadAttention"):
        allocate_ranks([layers[0], make_attention("mha", 24, 4)], params=10 ** 6)
    with pytest.raises(ValueError, match="layers is empty"):
        allocate_ranks([], params=10)


# -- random cases -----------------------------------------------------------------------------

@st.composite
def tucker_layer(draw):
    heads = draw(st.integers(1, 4))
    d = draw(st.sampled_from([8, 12, 16]))
    rope = draw(st.sampled_from([None, "latent"]))
    shared = draw(st.booleans())
    r3 = draw(st.integers(1, d // 2)) * 2 if rope else draw(st.integers(1, d))
    ranks = (draw(st.integers(1, heads)), draw(st.integers(1, d)), r3)
    value_ranks = (draw(st.integers(1, heads)), draw(st.integers(1, d)), r3 if shared else draw(st.integers(1, d)))
    torch.manual_seed(draw(st.integers(0, 10 ** 6)))
    return randomize_(TuckerAttention(d, heads, ranks, value_ranks=value_ranks, rope=rope, shared_kv=shared,
                                      bias=draw(st.booleans()), causal=draw(st.booleans())))


@settings(max_examples=30, deadline=None)
@given(layers=st.lists(tucker_layer(), min_size=1, max_size=3), kind=st.sampled_from(["params", "kv"]),
       fraction=st.floats(0.0, 1.0))
def test_random_allocation_is_the_greedy_rule(layers, kind, fraction):
    cost = _params if kind == "params" else _kv
    low = sum(cost(layer, s[:3], s[3:]) for layer in layers for s in [_lowest(layer, kind)])
    full = sum(cost(layer, layer.ranks, layer.value_ranks) for layer in layers)
    budget = low + int(fraction * (full - low))
    plan = allocate_ranks(layers, **{kind: budget})
    _check_plan(layers, plan, budget, kind)
    assert plan == _naive_greedy(layers, budget, kind)


@settings(max_examples=30, deadline=None)
@given(layer=tucker_layer(), data=st.data())
def test_random_truncation_matches_dense_projection(layer, data):
    layer = layer.double()
    fixed = _fixed(layer)
    ranks = tuple(now if fix else data.draw(st.integers(1, now)) for now, fix in zip(layer.ranks, fixed[0]))
    value_ranks = tuple(now if fix else data.draw(st.integers(1, now)) for now, fix in zip(layer.value_ranks, fixed[1]))
    if layer.shared_kv:
        value_ranks = value_ranks[:2] + (ranks[2],)
    new = layer.truncated(ranks, value_ranks)
    W, Wt = _dense(layer)
    W_hat, Wt_hat = _dense(new)
    projectors = _dense_projectors(layer, ranks, value_ranks)
    # a projection's energy is unique even where the kept subspace is not (equal singular values)
    for T, T_hat, P in ((W, W_hat, projectors[0]), (Wt, Wt_hat, projectors[1])):
        scale = float(T.square().sum())
        assert float(T_hat.square().sum()) == pytest.approx(float(_project(T, P).square().sum()), abs=1e-9 * scale)
        assert float((T - T_hat).square().sum()) == pytest.approx(scale - float(T_hat.square().sum()),
                                                                  abs=1e-9 * scale)
