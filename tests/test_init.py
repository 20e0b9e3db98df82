"""Initialization keeps activations at unit scale whatever the ranks (issue: naive per-factor
init grows the query scale with the ranks)."""

import pytest
import torch

from tucker_attention import MultiHeadAttention, MultiHeadLatentAttention, TuckerAttention

D, H = 256, 8
RANK_SWEEP = [(1, 16, 16), (2, 32, 16), (4, 64, 32), (8, 128, 64), (8, 256, 128), (8, 256, 256)]


def tucker_qkv(layer, x):
    G, _ = layer.head_cores()
    q = torch.einsum("bta,hac->bhtc", x @ layer.U2, G)
    return q, x @ layer.U3, x @ layer.value_factor


def output_variance(layer, x):
    with torch.no_grad():
        return layer(x).var().item()


@pytest.mark.parametrize("ranks", RANK_SWEEP)
def test_tucker_queries_keys_values_have_unit_variance(ranks):
    torch.manual_seed(0)
    x = torch.randn(16, 32, D)
    variances = {"q": [], "k": [], "v": []}
    for seed in range(4):                         # average over inits: r1 = 1 makes per-head scale random
        torch.manual_seed(seed)
        layer = TuckerAttention(D, H, ranks)
        with torch.no_grad():
            for name, t in zip("qkv", tucker_qkv(layer, x)):
                variances[name].append(t.var().item())
    for name, values in variances.items():
        mean = sum(values) / len(values)
        assert 0.7 < mean < 1.4, f"Var {name} = {mean:.3f} at ranks {ranks}"


@pytest.mark.parametrize("ranks", RANK_SWEEP)
@pytest.mark.parametrize("seq_len", [1, 16])
def test_tucker_output_variance_matches_mha(ranks, seq_len):
    x = torch.randn(32, seq_len, D)
    mha, tucker = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        mha.append(output_variance(MultiHeadAttention(D, H), x))
        tucker.append(output_variance(TuckerAttention(D, H, ranks, scale=(ranks[2]) ** -0.5), x))
    ratio = sum(tucker) / sum(mha)
    assert 0.6 < ratio < 1.6, f"Var(Tucker out) / Var(MHA out) = {ratio:.3f} at ranks {ranks}, seq {seq_len}"


@pytest.mark.parametrize("make", [lambda: MultiHeadAttention(D, H), lambda: TuckerAttention(D, H, (2, 32, 16)),
                                  lambda: TuckerAttention(D, H, (8, 256, 256)),
                                  lambda: MultiHeadLatentAttention(D, H, 32, q_rank=64)])
def test_single_token_output_variance_is_one(make):
    """With one token attention is the identity, so E Var y = Var v = 1 (averaged over inits:
    Tucker's heads share V, so one draw of a rank-2 head factor fluctuates widely)."""
    x = torch.randn(512, 1, D)
    values = []
    for seed in range(24):
        torch.manual_seed(seed)
        values.append(output_variance(make(), x))
    assert 0.6 < sum(values) / len(values) < 1.5


@pytest.mark.parametrize("kv_rank,q_rank", [(16, None), (64, 32), (256, 256)])
def test_mla_per_head_queries_keys_values_have_unit_variance(kv_rank, q_rank):
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(D, H, kv_rank, q_rank=q_rank)
    x = torch.randn(16, 32, D)
    with torch.no_grad():
        c_q = x if layer.q_down is None else layer.q_down(x)
        c = layer.kv_down(x)
        for name, t in (("latent", c), ("q", layer.q_up(c_q)), ("k", layer.k_up(c)), ("v", layer.v_up(c))):
            assert 0.8 < t.var().item() < 1.25, f"Var {name} at kv_rank={kv_rank}, q_rank={q_rank}"


def test_default_scale_is_the_papers():
    layer = TuckerAttention(768, 12, (8, 128, 64))
    assert layer.scale == pytest.approx(1 / 8.0)  # 1/sqrt(d_h) = 1/sqrt(r3) at r3 = head_dim
    assert TuckerAttention(768, 12, (8, 128, 64), scale=0.5).scale == 0.5
    assert TuckerAttention(768, 12, (8, 128, 16)).scale == pytest.approx(1 / 4.0)  # 1/sqrt(r3): unit logits


def test_default_scale_gives_unit_variance_logits_at_any_r3():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 128)
    for r3 in (8, 16, 64):
        variances = []
        for _ in range(6):  # average over inits: at small r3 one draw's scale is noisy
            layer = TuckerAttention(128, 4, (4, 32, r3))
            with torch.no_grad():
                q = torch.einsum("btr,hrs->bhts", x @ layer.U2, layer.head_cores()[0])
                logits = layer.scale * q @ (x @ layer.U3).transpose(-1, -2)[:, None]
            variances.append(logits.var().item())
        assert 0.8 < sum(variances) / len(variances) < 1.25, f"logit variance at r3={r3}: {variances}"
