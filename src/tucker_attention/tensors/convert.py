"""Conversions between attention layers through the tensor view.

- :func:`to_tucker`: the exact Tucker forms of Thms. B.2-B.4 (MHA, GQA/MQA, MLA).
- :func:`compress`: truncated HOSVD/HOOI of a trained layer's tensors -> TuckerAttention.
- :func:`mha_to_gqa`, :func:`mha_to_mla`: the paper's SVD baselines (App. C.1.4), so every
  method can start from the same pretrained MHA weights.

Every result is a new layer in the source's dtype and device, with the source's
``causal``, ``scale`` and ``dropout``; biases are carried exactly (see tensors.view).
"""

from __future__ import annotations

import copy

import torch

from .._checks import check_int, check_ranks
from ..layers import Attention, GroupedQueryAttention, MultiHeadLatentAttention, TuckerAttention
from .algebra import top_eigenvectors
from .view import HeadFactors, _check_finite, attention_factors, factored_hosvd


def _routing_core(h: int, width: int, per_group: int) -> torch.Tensor:
    """(h, h*width, (h/per_group)*width): core[i] is the identity from head i's block to its group's block."""
    core = torch.zeros(h, h * width, h // per_group * width, dtype=torch.float64)
    for i in range(h):
        g = i // per_group
        core[i, i * width:(i + 1) * width, g * width:(g + 1) * width] = torch.eye(width, dtype=torch.float64)
    return core


def _tucker_layer(source: Attention, pre, post, *, key_bias=None, out_bias=None, shared_kv: bool = False,
                  rope: bool = False) -> TuckerAttention:
    """A TuckerAttention holding the given (core, (U1, U2, U3)) pairs (float64), cast to the source's dtype."""
    (core, (U1, U2, U3)), (core_t, (U1_t, U2_t, U3_t)) = pre, post
    bias = key_bias is not None or out_bias is not None
    layer = TuckerAttention(source.d_model, source.n_heads, tuple(core.shape), value_ranks=tuple(core_t.shape),
                            shared_kv=shared_kv, causal=source.causal, rope=rope, dropout=source.dropout,
                            bias=bias, scale=source.scale,
                            rope_base=source.rotary.base if source.rotary is not None else 10000.0)
    values = {"core": core, "U1": U1, "U2": U2, "U3": U3, "core_tilde": core_t, "U1_tilde": U1_t, "U2_tilde": U2_t}
    if not shared_kv:
        values["_U3_tilde"] = U3_t
    if bias:
        zeros = torch.zeros(source.n_heads, source.d_model, dtype=torch.float64)
        u = key_bias if key_bias is not None else zeros
        values["q_bias"] = torch.linalg.lstsq(U3, u.T.to(U3.dtype)).solution.T   # u_i = U3 q_bias_i
        values["out_bias"] = out_bias if out_bias is not None else torch.zeros(source.d_model, dtype=torch.float64)
    layer = _copy_into(layer, values, source)
    if not all(torch.isfinite(p).all() for p in layer.parameters()):
        raise ValueError("the conversion produced non-finite weights; check the source layer's weights")
    return layer


def _copy_into(layer: Attention, values: dict[str, torch.Tensor], source: Attention) -> Attention:
    """Set the new layer's parameters from float64 ``values``, then move it to the source's dtype/device."""
    ref = next(source.parameters())
    layer = layer.to(torch.float64)                       # copy at full precision, cast once at the end
    with torch.no_grad():
        for name, value in values.items():
            layer.get_parameter(name).copy_(value)
    return layer.to(device=ref.device, dtype=ref.dtype)


def _fit_width(U: torch.Tensor, core: torch.Tensor, mode: int):
    """Keep a factor at most d columns wide: U = Q R (reduced QR), R moved into the core."""
    if U.shape[1] <= U.shape[0]:
        return U, core
    Q, R = torch.linalg.qr(U)
    return Q, torch.movedim(torch.tensordot(R, core, dims=([1], [mode - 1])), 0, mode - 1)


def _exact_pair(U1, U2, U3, core):
    U2, core = _fit_width(U2, core, 2)
    U3, core = _fit_width(U3, core, 3)
    return core, (U1, U2, U3)


def to_tucker(layer: Attention) -> TuckerAttention:
    """The exact Tucker form of a layer (PAPER.md §4, Thms. B.2-B.4); outputs are unchanged.

    MHA/GQA/MQA: U1 = I, U2 = W^Q, U3 = the n_kv key heads stacked, core routing head i to
    its key group; ranks (h, h*hd, n_kv*hd) for W and W_tilde. MLA: U2 = W^DQ (I without a
    query latent), U3 = W^DKV, core[i] = W^UQ_i W^UK_i^T; W_tilde ranks (h, h*hd, kv_rank).
    MLA with coupled RoPE (rope='latent') becomes Tucker with latent RoPE; a shared MLA
    latent becomes ``shared_kv``. Head-dimension RoPE and decoupled RoPE have no Tucker form.
    A factor wider than d_model is first reduced by a QR step (still exact).
    """
    if isinstance(layer, TuckerAttention):
        return copy.deepcopy(layer)
    is_mla = isinstance(layer, MultiHeadLatentAttention)
    if is_mla and layer.rope == "decoupled":
        raise ValueError("MLA with rope='decoupled' has no exact Tucker form (its RoPE key is a separate "
                         "branch); use rope='latent' (coupled RoPE, Cor. 3.2.1) or rope=None")
    # Coupled RoPE rotates the latent itself, so the offset-0 factors carry over exactly.
    factors = attention_factors(layer, ignore_rope=is_mla and layer.rope == "latent")
    p = {name: t.detach().to(torch.float64) for name, t in layer.named_parameters()}
    h, d = layer.n_heads, layer.d_model
    eye_h = torch.eye(h, dtype=torch.float64)
    if isinstance(layer, GroupedQueryAttention):
        hd, per_group = layer.head_dim, h // layer.n_kv_heads
        route = _routing_core(h, hd, per_group)
        pre = _exact_pair(eye_h, p["q_proj.weight"].T, p["k_proj.weight"].T, route)
        post = _exact_pair(eye_h, p["o_proj.weight"], p["v_proj.weight"].T, route.clone())
        return _tucker_layer(layer, pre, post, key_bias=factors.key_bias, out_bias=factors.out_bias)
    # MultiHeadLatentAttention (latent_norm and decoupled RoPE were refused above); kv_rank <= d_model,
    # so U3 = W^DKV is kept as it is and latent RoPE rotates the same coordinates.
    w_dq = p["q_down.weight"].T if layer.q_down is not None else torch.eye(d, dtype=torch.float64)
    w_dk, w_dv = ((p["kv_down.weight"].T,) * 2 if layer.shared_kv
                  else p["kv_down.weight"].T.split(layer.kv_rank, dim=1))
    core = layer.absorbed_query_weight().detach().to(torch.float64).permute(1, 0, 2)  # (h, q_in, kv_rank)
    hd = layer.head_dim
    core_t = torch.zeros(h, h * hd, layer.kv_rank, dtype=torch.float64)
    for i in range(h):
        core_t[i, i * hd:(i + 1) * hd] = p["v_up.weight"][i * hd:(i + 1) * hd]
    pre = _exact_pair(eye_h, w_dq, w_dk, core)
    post = _exact_pair(eye_h, p["o_proj.weight"], w_dv, core_t)
    return _tucker_layer(layer, pre, post, key_bias=factors.key_bias, out_bias=factors.out_bias,
                         shared_kv=layer.shared_kv, rope=layer.rope == "latent")


def compress(layer: Attention, ranks, value_ranks=None, *, method: str = "hosvd", n_iter: int = 10) -> TuckerAttention:
    """Truncated Tucker decomposition of a trained layer's W and W_tilde -> TuckerAttention.

    ``ranks`` = (r1, r2, r3) for W (head, query, key modes), ``value_ranks`` for W_tilde
    (head, output, value modes; default ``ranks``). ``method='hosvd'`` is the sequentially
    truncated HOSVD; ``'hooi'`` refines it by ``n_iter`` HOOI sweeps and is never worse.
    Works from the per-head factors (Gram matrices of size d x d at most), so a
    d_model=4096 layer needs no (h x d x d) tensor. At full ranks the output is exact.
    Biases are carried: the query bias is projected on the new key latent (exact when it
    lies in its span), value and output biases become the output bias.
    """
    factors = attention_factors(layer)
    highs = (layer.n_heads, layer.d_model, layer.d_model)
    ranks = check_ranks("ranks", ranks, highs)
    value_ranks = check_ranks("value_ranks", value_ranks if value_ranks is not None else ranks, highs)
    check_int("n_iter", n_iter, low=0)
    pre = factored_hosvd(factors.pre, ranks, method=method, n_iter=n_iter)
    post = factored_hosvd(factors.post, value_ranks, method=method, n_iter=n_iter)
    return _tucker_layer(layer, pre, post, key_bias=factors.key_bias, out_bias=factors.out_bias)


def _check_gqa_source(layer, name: str) -> GroupedQueryAttention:
    if not isinstance(layer, GroupedQueryAttention):
        raise TypeError(f"{name} converts MultiHeadAttention / GroupedQueryAttention layers, "
                        f"got {type(layer).__name__}")
    if layer.rotary is not None:
        raise ValueError(f"{name}: the source uses head-dimension RoPE, which an SVD of its weights does not "
                         f"preserve; convert a layer built with rope=False")
    _check_finite(layer)
    return layer


def _key_side_basis(factors: HeadFactors, heads: torch.Tensor, rank: int) -> torch.Tensor:
    """Best common rank-``rank`` key-side (mode-3) subspace of the given heads, (d, rank).

    Minimizes sum_{i in heads} ||T[i] - T[i] P P^T||_F^2: the leading eigenvectors of
    sum_i B_i (A_i^T A_i) B_i^T, the Gram of those heads' mode-3 unfolding.
    """
    return top_eigenvectors(HeadFactors(factors.A[heads], factors.B[heads]).gram(3), rank)


def mha_to_gqa(layer: GroupedQueryAttention, n_kv_heads: int) -> GroupedQueryAttention:
    """Initialize GQA with ``n_kv_heads`` from MHA (or GQA) weights by truncated SVD (App. C.1.4).

    For each group of heads, the shared key head spans the best common key-side subspace of
    the group's W[i] (and the shared value head that of W_tilde[i]); each query (output)
    projection is re-expressed in it. Exact when ``n_kv_heads == n_heads``. The query bias
    is carried, value biases move into the output bias, key biases cancel.
    """
    _check_gqa_source(layer, "mha_to_gqa")
    h, d, hd = layer.n_heads, layer.d_model, layer.head_dim
    check_int("n_kv_heads", n_kv_heads, high=h)
    if h % n_kv_heads:
        raise ValueError(f"n_heads={h} must be divisible by n_kv_heads={n_kv_heads}; "
                         f"allowed n_kv_heads: {[g for g in range(1, h + 1) if h % g == 0]}")
    if hd > d:
        raise ValueError(f"head_dim={hd} exceeds d_model={d}: no key subspace of that width")
    f = attention_factors(layer)
    bias = f.out_bias is not None
    target = GroupedQueryAttention(d, h, n_kv_heads, head_dim=hd, causal=layer.causal, dropout=layer.dropout,
                                   bias=bias, scale=layer.scale)
    q_w, k_w = torch.zeros(h * hd, d, dtype=torch.float64), torch.zeros(n_kv_heads * hd, d, dtype=torch.float64)
    v_w, o_w = torch.zeros_like(k_w), torch.zeros(d, h * hd, dtype=torch.float64)
    q_b = torch.zeros(h * hd, dtype=torch.float64)
    per_group = h // n_kv_heads
    for g in range(n_kv_heads):
        heads = torch.arange(g * per_group, (g + 1) * per_group)
        K, V = _key_side_basis(f.pre, heads, hd), _key_side_basis(f.post, heads, hd)   # (d, hd) each
        k_w[g * hd:(g + 1) * hd], v_w[g * hd:(g + 1) * hd] = K.T, V.T
        for i in heads.tolist():
            rows = slice(i * hd, (i + 1) * hd)
            q_w[rows] = (f.pre.A[i] @ (f.pre.B[i].T @ K)).T                  # W^Q_i' = W^Q_i W^K_i^T K
            o_w[:, rows] = f.post.A[i] @ (f.post.B[i].T @ V)                 # W^O_i'^T = W^O_i^T W^V_i^T V
            if bias:
                q_b[rows] = layer.q_proj.bias.detach().double()[rows] @ (f.pre.B[i].T @ K)
    values = {"q_proj.weight": q_w, "k_proj.weight": k_w, "v_proj.weight": v_w, "o_proj.weight": o_w}
    if bias:
        values.update({"q_proj.bias": q_b, "k_proj.bias": torch.zeros(n_kv_heads * hd),
                       "v_proj.bias": torch.zeros(n_kv_heads * hd), "o_proj.bias": f.out_bias})
    return _copy_into(target, values, layer)


def mha_to_mla(layer: GroupedQueryAttention, kv_rank: int, q_rank: int | None = None) -> MultiHeadLatentAttention:
    """Initialize MLA (shared K/V latent of width ``kv_rank``) from MHA/GQA weights by truncated SVD.

    The latent W^DKV spans the leading eigenvectors of the key-side Gram of W plus the
    value-side Gram of W_tilde (each normalized by its trace, so both count equally);
    W^UK_i, W^UV_i re-express each head in it. With ``q_rank`` the query latent W^DQ spans
    the leading query-side (mode-2) subspace of W. Exact at kv_rank = q_rank = d_model.
    """
    _check_gqa_source(layer, "mha_to_mla")
    h, d, hd = layer.n_heads, layer.d_model, layer.head_dim
    check_int("kv_rank", kv_rank, high=d)
    if q_rank is not None:
        check_int("q_rank", q_rank, high=d)
    f = attention_factors(layer)
    bias = f.out_bias is not None
    target = MultiHeadLatentAttention(d, h, kv_rank, q_rank=q_rank, head_dim=hd, causal=layer.causal,
                                      dropout=layer.dropout, bias=bias, scale=layer.scale)
    key_gram, value_gram = f.pre.gram(3), f.post.gram(3)
    U = top_eigenvectors(key_gram / key_gram.trace() + value_gram / value_gram.trace(), kv_rank)   # (d, kv_rank)
    values = {"kv_down.weight": U.T,
              "k_up.weight": (U.T @ f.pre.B).mT.reshape(h * hd, kv_rank),       # W^UK_i = U^T W^K_i
              "v_up.weight": (U.T @ f.post.B).mT.reshape(h * hd, kv_rank),      # W^UV_i = U^T W^V_i
              "o_proj.weight": f.post.A.permute(1, 0, 2).reshape(d, h * hd)}
    if q_rank is None:
        values["q_up.weight"] = f.pre.A.mT.reshape(h * hd, d)
    else:
        P = top_eigenvectors(f.pre.gram(2), q_rank)                             # (d, q_rank)
        values["q_down.weight"] = P.T
        values["q_up.weight"] = (P.T @ f.pre.A).mT.reshape(h * hd, q_rank)
    if bias:
        values["q_up.bias"], values["o_proj.bias"] = layer.q_proj.bias.detach().double(), f.out_bias
    return _copy_into(target, values, layer)


@torch.no_grad()
def relative_error(reference: torch.nn.Module, approximation: torch.nn.Module, x: torch.Tensor) -> float:
    """||f(x) - g(x)|| / ||f(x)|| on inputs x (B, T, d): how far a converted layer's outputs move."""
    want = reference(x)
    return float((approximation(x) - want).norm() / want.norm())


def _input_side(layer: Attention) -> dict[str, str]:
    """{parameter name: 'linear' | 'factor'} of the weights that act on the layer's input x."""
    if isinstance(layer, GroupedQueryAttention):
        return dict.fromkeys(("q_proj.weight", "k_proj.weight", "v_proj.weight"), "linear")
    if isinstance(layer, MultiHeadLatentAttention):
        names = ["q_down.weight" if layer.q_down is not None else "q_up.weight", "kv_down.weight"]
        return dict.fromkeys(names + (["k_rope.weight"] if layer.k_rope is not None else []), "linear")
    if isinstance(layer, TuckerAttention):
        return dict.fromkeys(["U2", "U3"] + ([] if layer.shared_kv else ["_U3_tilde"]), "factor")
    raise TypeError(f"no input side known for {type(layer).__name__}")


def input_transform(layer: Attention, matrix: torch.Tensor) -> Attention:
    """The layer computing ``layer(x @ matrix)`` (matrix (d, d)): every weight acting on x absorbs it.

    With ``matrix = S = Sigma^{1/2}`` (Sigma = E[x^T x] of real inputs) a conversion done on the
    transformed layer minimizes the error on those inputs (activation-aware truncation:
    ||S (W - W_hat) S||_F for W, ||(W_tilde - W_tilde_hat) S||_F for W_tilde); ``S^{-1}`` maps back.
    """
    d = layer.d_model
    if tuple(matrix.shape) != (d, d):
        raise ValueError(f"matrix must be (d_model, d_model) = ({d}, {d}), got {tuple(matrix.shape)}")
    ref = next(layer.parameters())
    M = matrix.detach().to(device=ref.device, dtype=torch.float64)
    new = copy.deepcopy(layer).to(torch.float64)
    with torch.no_grad():
        for name, kind in _input_side(layer).items():
            p = new.get_parameter(name)
            p.copy_(p @ M.T if kind == "linear" else M @ p)       # Linear (out, d): (xM) W^T; factor (d, r): (xM) U
    return new.to(dtype=ref.dtype)


def whitening(second_moment: torch.Tensor, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^{-1}) with S = (Sigma + eps * mean eigenvalue * I)^{1/2}, float64; Sigma (d, d) symmetric PSD.

    ``eps`` keeps S invertible (and its inverse tame) when the inputs span fewer than d directions.
    """
    if not isinstance(second_moment, torch.Tensor):
        raise ValueError(f"second_moment must be a finite square (d, d) tensor, got {type(second_moment).__name__}")
    sigma = second_moment.detach().to(torch.float64)
    if sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1] or not torch.isfinite(sigma).all():
        raise ValueError(f"second_moment must be a finite square (d, d) matrix, got shape {tuple(sigma.shape)}")
    sigma = (sigma + sigma.T) / 2
    values, vectors = torch.linalg.eigh(sigma)
    values = values.clamp(min=0) + eps * values.clamp(min=0).mean()
    if not values.min() > 0:
        raise ValueError("second_moment is zero: no inputs were recorded")
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T
