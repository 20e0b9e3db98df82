"""Rank budgets: ranks per layer from a parameter or KV-cache budget (tensors.budget)."""

import pytest
import torch

from tucker_attention.layers import GroupedQueryAttention, MultiHeadAttention
from tucker_attention.tensors import attention_tensors, compress, hosvd, plan_ranks, tucker_param_count


def _layers(bias=False, rope=False):
    torch.manual_seed(0)
    layers = {}
    for i, decay in enumerate((0.5, 0.9, 0.99)):          # spectra of different steepness
        layer = MultiHeadAttention(32, 4, bias=bias, rope=rope)
        with torch.no_grad():
            for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
                u, s, vt = torch.linalg.svd(proj.weight, full_matrices=False)
                proj.weight.copy_(u @ torch.diag(s * decay ** torch.arange(len(s))) @ vt)
                if bias:
                    proj.bias.normal_()
        layers[f"block{i}"] = layer
    return layers


@pytest.mark.parametrize("budget", [{"params": 0.2}, {"params": 5000}, {"kv": 0.25}, {"kv": 20}])
def test_plan_fits_budget_and_counts_match_built_layers(budget):
    layers = _layers(bias=True)
    plan = plan_ranks(layers, **budget)
    built = [compress(layer, r, v) for layer, r, v in zip(layers.values(), plan.ranks, plan.value_ranks)]
    assert plan.params == sum(sum(p.numel() for p in b.parameters()) for b in built)
    assert plan.kv == sum(sum(h * w for h, w in b.cache_spec().values()) for b in built)
    if "params" in budget:
        limit = budget["params"] if budget["params"] > 1 else int(budget["params"] * plan.source_params)
        assert plan.params <= limit
    else:
        limit = budget["kv"] if budget["kv"] > 1 else int(budget["kv"] * plan.source_kv)
        assert plan.kv <= limit
    assert plan.paths == list(layers)
    assert "energy level" in plan.table() and "block2" in plan.table()


def test_steeper_spectra_get_smaller_ranks():
    plan = plan_ranks(_layers(), params=0.3)
    r2 = [r[1] for r in plan.ranks]
    assert r2[0] <= r2[1] <= r2[2] and r2[0] < r2[2]


def test_errors_equal_dense_hosvd_reference():
    layers = _layers()
    plan = plan_ranks(layers, params=0.3)
    for layer, ranks, value_ranks, (err_w, err_wt) in zip(layers.values(), plan.ranks, plan.value_ranks,
                                                         plan.errors):
        W, Wt = (t.double() for t in attention_tensors(layer))
        for T, r, err in ((W, ranks, err_w), (Wt, value_ranks, err_wt)):
            approx = hosvd(T, r, order=(2, 3, 1)).to_tensor()
            assert err == pytest.approx(float((T - approx).norm() / T.norm()), abs=1e-6)


def test_larger_budget_never_increases_error():
    layers = _layers()
    small, large = plan_ranks(layers, params=0.15), plan_ranks(layers, params=0.5)
    assert large.params > small.params
    for (a, b), (c, d) in zip(small.errors, large.errors):
        assert c <= a + 1e-9 and d <= b + 1e-9


def test_full_budget_is_exact():
    plan = plan_ranks(_layers(), params=10 ** 9)
    assert plan.energy == 1.0
    assert all(e < 1e-5 for pair in plan.errors for e in pair)   # energy 1 - 1e-12 drops only ~1e-6


def test_rope_sources_get_even_r3():
    torch.manual_seed(1)
    layers = {"a": GroupedQueryAttention(32, 4, 2, rope=True), "b": GroupedQueryAttention(32, 4, 2, rope=True)}
    for budget in (0.1, 0.2, 0.35):
        assert all(r[2] % 2 == 0 for r in plan_ranks(layers, params=budget).ranks)


def test_tucker_param_count_formula():
    assert tucker_param_count(4, 32, (2, 8, 6), (3, 5, 7), bias=False) == (2 * 8 * 6 + 4 * 2 + 32 * 14
                                                                                + 3 * 5 * 7 + 4 * 3 + 32 * 12)
    assert tucker_param_count(4, 32, (2, 8, 6), (2, 8, 6), bias=True) - tucker_param_count(
        4, 32, (2, 8, 6), (2, 8, 6), bias=False) == 4 * 6 + 32


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give a budget"),
    ({"params": 1.0, "kv": 1}, "kv budget 1 is below the smallest Tucker setting"),     # both must hold
    ({"params": -3}, "params must be a positive whole count"),
    ({"kv": True}, "kv must be a positive whole count"),
    ({"params": 10}, "below the smallest Tucker setting"),
])
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_ranks(_layers(), **kwargs)


def test_empty_layers():
    with pytest.raises(ValueError, match="layers is empty"):
        plan_ranks({}, params=0.5)
