"""The tensor view (PAPER.md §1, §4): attention tensors reproduce the layer; the exact
Tucker forms of Thms. B.2-B.4; compression and the SVD baselines."""

import pytest
import torch
from conftest import LAYER_CONFIGS, randomize_
from hypothesis import given, settings
from hypothesis import strategies as st

from tucker_attention import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    TuckerAttention,
    make_attention,
)
from tucker_attention.tensors import (
    attention_factors,
    attention_tensors,
    compress,
    factored_hosvd,
    hooi,
    hosvd,
    mha_to_gqa,
    mha_to_mla,
    multilinear_ranks,
    relative_error,
    to_tucker,
)

D, H = 32, 4
LINEAR_CONFIGS = [(m, kw) for m, kw in LAYER_CONFIGS if not kw.get("rope") and not kw.get("latent_norm")]


def build(method, **kwargs):
    torch.manual_seed(0)
    return randomize_(make_attention(method, D, H, **kwargs)).double()


def tensor_forward(W, W_tilde, scale, x, causal):
    """y = sum_i softmax(scale x W[i] x^T) (x W_tilde[i]^T): PAPER.md §1, explicit softmax."""
    logits = scale * torch.einsum("btp,ipq,bsq->bits", x, W, x)
    if causal:
        logits = logits.masked_fill(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1), float("-inf"))
    values = torch.einsum("bsq,ipq->bisp", x, W_tilde)
    return (torch.softmax(logits, -1) @ values).sum(1)


@pytest.mark.parametrize("method,kwargs", [(m, {k: v for k, v in kw.items() if not k.endswith("bias")})
                                           for m, kw in LINEAR_CONFIGS])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_tensors_reproduce_the_forward(method, kwargs, causal):
    layer = build(method, causal=causal, **kwargs)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    W, W_tilde = attention_tensors(layer)
    assert W.shape == W_tilde.shape == (H, D, D)
    torch.testing.assert_close(tensor_forward(W, W_tilde, layer.scale, x, causal), layer(x), atol=1e-9, rtol=1e-9)


def test_orientation_of_w_tilde_is_pinned():
    """W_tilde[i] = (W^V_i W^O_i)^T with x a row vector: a transposed W_tilde would fail here."""
    layer = build("mha")
    W, W_tilde = attention_tensors(layer)
    hd = D // H
    for i in range(H):
        w_q = layer.q_proj.weight[i * hd:(i + 1) * hd].T                # (d, hd): q_i = x W^Q_i
        w_k = layer.k_proj.weight[i * hd:(i + 1) * hd].T
        w_v = layer.v_proj.weight[i * hd:(i + 1) * hd].T
        w_o = layer.o_proj.weight[:, i * hd:(i + 1) * hd].T               # (hd, d): y += o_i W^O_i
        torch.testing.assert_close(W[i], w_q @ w_k.T)
        torch.testing.assert_close(W_tilde[i], (w_v @ w_o).T)
    assert (W_tilde - W_tilde.mT).abs().max() > 1e-3                       # not symmetric: transposition shows


def test_rope_layers_have_no_fixed_tensor():
    layer = build("mha", rope=True)
    with pytest.raises(ValueError, match="uses RoPE, so its logits depend on positions"):
        attention_tensors(layer)
    W, _ = attention_tensors(layer, ignore_rope=True)                      # the weights at offset 0
    assert W.shape == (H, D, D)


def test_bad_layers():
    with pytest.raises(TypeError, match="layer must be a tucker_attention attention layer"):
        attention_tensors(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="latent_norm=True is not linear"):
        attention_tensors(build("mla", kv_rank=8, latent_norm=True))
    layer = build("mha")
    with torch.no_grad():
        layer.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'k_proj.weight' has non-finite values"):
        compress(layer, (2, 8, 8))


# -- Thms. B.2-B.4: the exact Tucker forms ------------------------------------------------------
THEOREM_CASES = [
    ("mha", {}, (H, D, D), (H, D, D)),
    ("gqa", {"n_kv_heads": 2}, (H, D, 2 * D // H), (H, D, 2 * D // H)),
    ("mqa", {}, (H, D, D // H), (H, D, D // H)),
    ("mla", {"kv_rank": 12, "q_rank": 10}, (H, 10, 12), (H, D, 12)),
    ("mla", {"kv_rank": 12}, (H, D, 12), (H, D, 12)),
    ("mla", {"kv_rank": 12, "q_rank": 10, "shared_kv": False}, (H, 10, 12), (H, D, 12)),
    ("mla", {"kv_rank": 12, "q_rank": 10, "down_bias": True}, (H, 10, 12), (H, D, 12)),   # DeepSeek's biases
]


@pytest.mark.parametrize("method,kwargs,ranks,value_ranks", THEOREM_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_to_tucker_is_exact_with_the_theorems_ranks(method, kwargs, ranks, value_ranks, bias):
    layer = build(method, causal=True, bias=bias, **kwargs)
    tucker = to_tucker(layer)
    assert isinstance(tucker, TuckerAttention)
    assert tucker.ranks == ranks and tucker.value_ranks == value_ranks
    assert tucker.shared_kv == (method == "mla" and kwargs.get("shared_kv", True))
    x = torch.randn(2, 7, D, dtype=torch.float64)
    torch.testing.assert_close(tucker(x), layer(x), atol=1e-9, rtol=1e-9)
    W, W_tilde = attention_tensors(layer)
    assert multilinear_ranks(W) == ranks and multilinear_ranks(W_tilde) == value_ranks   # generic weights: maximal


def test_mla_with_coupled_rope_becomes_tucker_with_latent_rope():
    layer = build("mla", kv_rank=12, q_rank=10, rope="latent", causal=True, bias=True)
    tucker = to_tucker(layer)
    assert tucker.rotary is not None and tucker.shared_kv and tucker.ranks == (H, 10, 12)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    torch.testing.assert_close(tucker(x), layer(x), atol=1e-9, rtol=1e-9)
    cache = tucker.make_cache(2, 9)
    steps = [tucker(x[:, :4], cache=cache)] + [tucker(x[:, t:t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), layer(x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("layer,message", [(lambda: build("mha", rope=True, qk_norm=True), "not linear in x"),
                                           (lambda: build("mla", kv_rank=8, rope="decoupled", latent_norm=True),
                                            "not linear in x")])
def test_layers_without_a_tucker_form_are_refused(layer, message):
    with pytest.raises(ValueError, match=message):                # norms between projections (RoPE has a form)
        to_tucker(layer())


@st.composite
def theorem_layers(draw):
    h = draw(st.integers(1, 4))
    hd = draw(st.integers(1, 4))
    d = h * hd * draw(st.integers(1, 2))
    if draw(st.booleans()):
        layer = GroupedQueryAttention(d, h, draw(st.sampled_from([g for g in range(1, h + 1) if h % g == 0])),
                                      head_dim=hd)
        bound = (h, h * hd, layer.n_kv_heads * hd), (h, h * hd, layer.n_kv_heads * hd)
    else:
        kv, q = draw(st.integers(1, d)), draw(st.none() | st.integers(1, d))
        layer = MultiHeadLatentAttention(d, h, kv, q_rank=q, head_dim=hd, shared_kv=draw(st.booleans()))
        bound = (h, q or d, kv), (h, h * hd, kv)
    return layer.double(), bound


@settings(max_examples=25, deadline=None)
@given(case=theorem_layers(), seed=st.integers(0, 99))
def test_theorems_over_random_shapes(case, seed):
    """Measured ranks never exceed the theorems' maximal ranks, and to_tucker is exact."""
    layer, (ranks, value_ranks) = case
    torch.manual_seed(seed)
    W, W_tilde = attention_tensors(layer)
    for measured, bound in ((multilinear_ranks(W), ranks), (multilinear_ranks(W_tilde), value_ranks)):
        assert all(m <= min(b, layer.d_model) for m, b in zip(measured, bound)), (measured, bound)
    x = torch.randn(2, 5, layer.d_model, dtype=torch.float64)
    torch.testing.assert_close(to_tucker(layer)(x), layer(x), atol=1e-9, rtol=1e-9)


# -- compression ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kwargs", LINEAR_CONFIGS)
def test_compress_is_exact_at_full_ranks(method, kwargs):
    layer = build(method, causal=True, **kwargs)
    tucker = compress(layer, (H, D, D))
    x = torch.randn(2, 6, D, dtype=torch.float64)
    torch.testing.assert_close(tucker(x), layer(x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("ranks", [(2, 8, 8), (4, 16, 4), (1, 20, 12)])
def test_factored_path_equals_dense_hosvd_and_hooi_is_never_worse(ranks):
    layer = build("mha")
    factors = attention_factors(layer).pre
    W = factors.dense()
    light = factored_hosvd(factors, ranks)
    dense = hosvd(W, ranks, order=(2, 3, 1))
    torch.testing.assert_close(light.to_tensor(), dense.to_tensor(), atol=1e-10, rtol=0)
    errors = {}
    for method in ("hosvd", "hooi"):
        approx = factored_hosvd(factors, ranks, method=method, n_iter=15)
        errors[method] = float((approx.to_tensor() - W).norm() / W.norm())
    assert errors["hooi"] <= errors["hosvd"] + 1e-12
    dense_hooi = float((hooi(W, ranks, n_iter=15).to_tensor() - W).norm() / W.norm())
    assert errors["hooi"] == pytest.approx(dense_hooi, rel=0.02)


def test_compress_keeps_biases_exact_at_full_rank_and_picks_the_requested_ranks():
    layer = build("gqa", n_kv_heads=2, bias=True, causal=True)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    torch.testing.assert_close(compress(layer, (H, D, D))(x), layer(x), atol=1e-9, rtol=1e-9)
    small = compress(layer, (2, 12, 8), value_ranks=(3, 10, 6), method="hooi", n_iter=3)
    assert small.ranks == (2, 12, 8) and small.value_ranks == (3, 10, 6)
    assert all(torch.isfinite(p).all() for p in small.parameters())
    errors = [relative_error(layer, compress(layer, (r1, r, r)), x) for r1, r in ((1, 4), (2, 8), (4, 16), (4, 32))]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-9


def test_compress_rejects_bad_ranks():
    layer = build("mha")
    with pytest.raises(ValueError, match=r"ranks\[0\] \(r1\) must be an integer in \[1, 4\], got 5"):
        compress(layer, (5, 8, 8))
    with pytest.raises(ValueError, match=r"value_ranks\[1\] \(r2\) must be an integer in \[1, 32\], got 33"):
        compress(layer, (2, 8, 8), value_ranks=(2, 33, 8))
    with pytest.raises(ValueError, match="method must be 'hosvd' or 'hooi', got 'svd'"):
        compress(layer, (2, 8, 8), method="svd")
    with pytest.raises(ValueError, match="by its RoPE pairs with method='hosvd'"):
        compress(build("mha", rope=True), (2, 8, 8), method="hooi")
    with pytest.raises(ValueError, match=r"ranks\[2\] \(r3\) must be even"):
        compress(build("mha", rope=True), (2, 8, 7))
    with pytest.raises(ValueError, match=r"ranks\[2\] \(r3\) must be at most 16, the exact latent-RoPE"):
        compress(build("gqa", n_kv_heads=2, rope=True), (2, 8, 18))           # 2 key heads of width 8


def test_compress_keeps_dtype_device_and_settings():
    layer = MultiHeadAttention(D, H, causal=True, dropout=0.1, scale=0.3)
    tucker = compress(layer, (2, 8, 8))
    assert next(tucker.parameters()).dtype == torch.float32
    assert tucker.causal and tucker.dropout == 0.1 and tucker.scale == 0.3


# -- the SVD baselines (App. C.1.4) --------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_mha_to_gqa_and_mla_are_exact_at_full_size_and_degrade_gracefully(bias):
    layer = build("mha", causal=True, bias=bias)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    torch.testing.assert_close(mha_to_gqa(layer, H)(x), layer(x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(mha_to_mla(layer, D)(x), layer(x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(mha_to_mla(layer, D, q_rank=D)(x), layer(x), atol=1e-9, rtol=1e-9)
    gqa_errors = [relative_error(layer, mha_to_gqa(layer, g), x) for g in (1, 2, 4)]
    mla_errors = [relative_error(layer, mha_to_mla(layer, c, q_rank=c), x) for c in (4, 16, 32)]
    assert gqa_errors == sorted(gqa_errors, reverse=True) and mla_errors == sorted(mla_errors, reverse=True)
    gqa = mha_to_gqa(layer, 2)
    assert isinstance(gqa, GroupedQueryAttention) and gqa.n_kv_heads == 2 and gqa.causal


def test_gqa_conversion_beats_mean_pooling_of_key_heads():
    """The SVD key subspace is the best common one, so it must beat Ainslie et al.'s mean pooling."""
    layer = build("mha")
    x = torch.randn(4, 8, D, dtype=torch.float64)
    pooled = GroupedQueryAttention(D, H, 1).double()
    with torch.no_grad():
        hd = D // H
        pooled.q_proj.weight.copy_(layer.q_proj.weight)
        pooled.o_proj.weight.copy_(layer.o_proj.weight)
        pooled.k_proj.weight.copy_(layer.k_proj.weight.view(H, hd, D).mean(0))
        pooled.v_proj.weight.copy_(layer.v_proj.weight.view(H, hd, D).mean(0))
    assert relative_error(layer, mha_to_gqa(layer, 1), x) < relative_error(layer, pooled, x)


def test_baseline_conversion_errors():
    layer = build("mha")
    with pytest.raises(ValueError, match=r"n_heads=4 must be divisible by n_kv_heads=3"):
        mha_to_gqa(layer, 3)
    with pytest.raises(ValueError, match=r"kv_rank must be an integer in \[1, 32\], got 40"):
        mha_to_mla(layer, 40)
    with pytest.raises(TypeError, match="converts tucker_attention attention layers"):
        mha_to_gqa(torch.nn.Linear(32, 32), 2)
    with pytest.raises(ValueError, match=r"the source uses RoPE \(rope='decoupled'\).*only head RoPE"):
        mha_to_mla(build("mla", kv_rank=8, rope="decoupled"), 8)


@pytest.mark.parametrize("method,kwargs", [("gqa", {"n_kv_heads": 2}), ("mla", {"kv_rank": 16})])
@pytest.mark.parametrize("ranks", [(2, 8, 8), (3, 16, 12)])
def test_compression_error_matches_reference_decompositions(method, kwargs, ranks):
    """HOOI reaches tensorly's Tucker (HOOI) fit; the sequential HOSVD is within a few percent
    of the classic truncated HOSVD (leading singular vectors of each unfolding, via SVD)."""
    import numpy as np
    import tensorly as tl
    from tensorly.decomposition import tucker as tl_tucker

    tl.set_backend("numpy")
    layer = build(method, **kwargs)
    factors = attention_factors(layer)
    for head_factors, W in zip((factors.pre, factors.post), attention_tensors(layer)):
        ours = {m: float((factored_hosvd(head_factors, ranks, method=m, n_iter=20).to_tensor() - W).norm() / W.norm())
                for m in ("hosvd", "hooi")}
        core, tl_factors = tl_tucker(W.numpy(), rank=list(ranks), n_iter_max=200, init="svd", tol=1e-12)
        tensorly_error = np.linalg.norm(tl.tucker_to_tensor((core, tl_factors)) - W.numpy()) / np.linalg.norm(W.numpy())
        Us = [torch.linalg.svd(W.movedim(n, 0).reshape(W.shape[n], -1), full_matrices=False).U[:, :r]
              for n, r in enumerate(ranks)]
        classic = torch.einsum("ipq,ia,pb,qc->abc", W, *Us)
        classic_error = float((torch.einsum("abc,ia,pb,qc->ipq", classic, *Us) - W).norm() / W.norm())
        assert ours["hooi"] == pytest.approx(tensorly_error, rel=0.01)
        assert ours["hosvd"] == pytest.approx(classic_error, rel=0.03)


@pytest.mark.parametrize("method,kwargs", [("gqa", {"n_kv_heads": 2}), ("mla", {"kv_rank": 12, "q_rank": 10}),
                                           ("tucker", {"ranks": (2, 16, 8)})])
def test_factor_grams_spectra_and_norm_equal_the_dense_tensors(method, kwargs):
    from tucker_attention.tensors import mode_spectra, unfold

    factors = attention_factors(build(method, **kwargs))
    for head_factors in (factors.pre, factors.post):
        T = head_factors.dense()
        for mode in (1, 2, 3):
            torch.testing.assert_close(head_factors.gram(mode), unfold(T, mode) @ unfold(T, mode).T)
        for light, dense in zip(head_factors.spectra(), mode_spectra(T)):
            n = dense.numel()
            torch.testing.assert_close(light[:n], dense, atol=1e-7 * float(dense[0]), rtol=0)
        torch.testing.assert_close(head_factors.norm_squared(), T.square().sum())
