"""Conversions between attention layers through the tensor view.

- :func:`to_tucker`: the exact Tucker forms of Thms. B.2-B.4 (MHA, GQA/MQA, MLA).
- :func:`compress`: truncated HOSVD/HOOI of a trained layer's tensors -> TuckerAttention.
- :func:`mha_to_gqa`, :func:`mha_to_mla`: the paper's SVD baselines (App. C.1.4), so every
  method can start from the same pretrained MHA weights.

:func:`~.methods.convert_layer` (re-exported here) converts by a registered method's name.

Sources with RoPE keep it exactly (:mod:`.rope`): Tucker and MLA get latent RoPE whose pairs
carry the source's frequencies, GQA merges key heads pair by pair.

Every result is a new layer in the source's dtype and device, with the source's
``causal``, ``scale`` and ``dropout``; biases are carried exactly (see tensors.view).
"""

from __future__ import annotations

import copy

import torch

from .._checks import check_int, check_ranks
from ..layers import Attention, GroupedQueryAttention, MultiHeadLatentAttention, TuckerAttention
from .algebra import top_eigenvectors
from .exact import to_tucker  # noqa: F401  (re-exported: tensors.convert.to_tucker)
from .methods import CONVERSIONS, convert_layer  # noqa: F401  (re-exported: tensors.convert.convert_layer)
from .rope import rope_compress, rope_gqa, rope_mla
from .view import attention_factors, check_finite, factored_hosvd, key_side_basis


def compress(layer: Attention, ranks, value_ranks=None, *, method: str = "hosvd", n_iter: int = 10,
             ignore_rope: bool = False, nope_fraction: float = 0.0) -> TuckerAttention:
    """Truncated Tucker decomposition of a trained layer's W and W_tilde -> TuckerAttention.

    ``ranks`` = (r1, r2, r3) for W (head, query, key modes), ``value_ranks`` for W_tilde
    (head, output, value modes; default ``ranks``). ``method='hosvd'`` is the sequentially
    truncated HOSVD; ``'hooi'`` refines it by ``n_iter`` HOOI sweeps and is never worse.
    Works from the per-head factors (Gram matrices of size d x d at most), so a
    d_model=4096 layer needs no (h x d x d) tensor. At full ranks the output is exact.
    Biases are carried: the query bias is projected on the new key latent (exact when it
    lies in its span), value and output biases become the output bias.

    A RoPE layer gives latent RoPE, exact at the exact form's ranks (:func:`.rope.rope_compress`;
    ranks at most those, ``method='hosvd'``; ``nope_fraction``: partial RoPE, :func:`.rope.derotated`);
    with ``ignore_rope`` its weights at offset 0 are compressed instead (see
    :func:`~.view.attention_factors`) and the result has no RoPE.
    """
    if isinstance(layer, Attention) and (layer.rope is not None and not ignore_rope or layer.exact_with_norms()):
        if method != "hosvd":
            raise ValueError(f"method={method!r}: a RoPE layer is compressed by its RoPE pairs with method='hosvd' "
                             f"(or pass ignore_rope=True to compress its weights at offset 0)")
        return rope_compress(layer, ranks, value_ranks, nope_fraction=nope_fraction)
    if nope_fraction:
        raise ValueError(f"nope_fraction={nope_fraction} is partial RoPE, for a layer with RoPE converted with it")
    factors = attention_factors(layer, ignore_rope=ignore_rope)
    highs = (layer.n_heads, layer.d_model, layer.d_model)
    ranks = check_ranks("ranks", ranks, highs)
    value_ranks = check_ranks("value_ranks", value_ranks if value_ranks is not None else ranks, highs)
    check_int("n_iter", n_iter, low=0)
    pre = factored_hosvd(factors.pre, ranks, method=method, n_iter=n_iter)
    post = factored_hosvd(factors.post, value_ranks, method=method, n_iter=n_iter)
    return TuckerAttention.from_factors(layer, pre, post,
                                        key_bias=factors.key_bias, out_bias=factors.out_bias)


def _check_source(layer, name: str, ignore_rope: bool = False) -> bool:
    """Whether the RoPE-exact conversion applies (a head-RoPE source); refuses other RoPE sources."""
    if not isinstance(layer, Attention):
        raise TypeError(f"{name} converts tucker_attention attention layers (e.g. MultiHeadAttention), "
                        f"got {type(layer).__name__}")
    check_finite(layer)
    if layer.rope is None or ignore_rope:
        return False
    if layer.rope != "head":
        raise ValueError(f"{name}: the source uses RoPE (rope={layer.rope!r}), which an SVD of its weights does "
                         f"not preserve (only head RoPE is kept exactly); convert a layer built with rope=None or "
                         f"pass ignore_rope=True")
    return True


def _query_bias(key_bias: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Per-head query biases b_i (h, k) with B_i b_i = key_bias_i (least squares; exact when the key
    bias lies in the span of B_i, as it does for a layer's own query bias)."""
    return torch.linalg.lstsq(B, key_bias.unsqueeze(-1)).solution.squeeze(-1)


def _normalized(gram: torch.Tensor) -> torch.Tensor:
    """A Gram matrix scaled to unit trace (left as it is when it is zero: a layer with zero weights)."""
    trace = gram.trace()
    return gram / trace if trace > 0 else gram


def mha_to_gqa(layer: Attention, n_kv_heads: int, *, ignore_rope: bool = False) -> GroupedQueryAttention:
    """Initialize GQA with ``n_kv_heads`` from MHA (or GQA) weights by truncated SVD (App. C.1.4).

    For each group of heads, the shared key head spans the best common key-side subspace of
    the group's W[i] (and the shared value head that of W_tilde[i]); each query (output)
    projection is re-expressed in it. Exact when ``n_kv_heads == n_heads``. The query bias
    is carried, value biases move into the output bias, key biases cancel. Works from the
    tensor view, so any layer without RoPE is a source (a RoPE layer with ``ignore_rope``, from its
    weights at offset 0; the result has no RoPE); head_dim is its per-head factor width. A head-RoPE
    source keeps its RoPE exactly: key heads are merged pair by pair (:func:`.rope.rope_gqa`).
    """
    if _check_source(layer, "mha_to_gqa", ignore_rope):
        return rope_gqa(layer, n_kv_heads)
    h, d = layer.n_heads, layer.d_model
    check_int("n_kv_heads", n_kv_heads, high=h)
    if h % n_kv_heads:
        raise ValueError(f"n_heads={h} must be divisible by n_kv_heads={n_kv_heads}; "
                         f"allowed n_kv_heads: {[g for g in range(1, h + 1) if h % g == 0]}")
    f = attention_factors(layer, ignore_rope=ignore_rope)
    hd = f.pre.A.shape[2]
    if hd > d or f.post.A.shape[2] != hd:
        raise ValueError(f"mha_to_gqa needs per-head widths <= d_model={d} equal for W and W_tilde, got "
                         f"{hd} and {f.post.A.shape[2]}")
    bias = f.out_bias is not None or f.key_bias is not None
    target = GroupedQueryAttention(d, h, n_kv_heads, head_dim=hd, causal=layer.causal, dropout=layer.dropout,
                                   bias=bias, scale=layer.scale)
    q_w, k_w = torch.zeros(h * hd, d, dtype=torch.float64), torch.zeros(n_kv_heads * hd, d, dtype=torch.float64)
    v_w, o_w = torch.zeros_like(k_w), torch.zeros(d, h * hd, dtype=torch.float64)
    q_b = torch.zeros(h * hd, dtype=torch.float64)
    per_group = h // n_kv_heads
    for g in range(n_kv_heads):
        heads = torch.arange(g * per_group, (g + 1) * per_group)
        K, V = key_side_basis(f.pre, heads, hd), key_side_basis(f.post, heads, hd)   # (d, hd) each
        k_w[g * hd:(g + 1) * hd], v_w[g * hd:(g + 1) * hd] = K.T, V.T
        for i in heads.tolist():
            rows = slice(i * hd, (i + 1) * hd)
            q_w[rows] = (f.pre.A[i] @ (f.pre.B[i].T @ K)).T                  # W^Q_i' = W^Q_i W^K_i^T K
            o_w[:, rows] = f.post.A[i] @ (f.post.B[i].T @ V)                 # W^O_i'^T = W^O_i^T W^V_i^T V
            if f.key_bias is not None:
                q_b[rows] = f.key_bias[i] @ K                                # b_i' = K^T (W^K_i b_i)
    values = {"q_proj.weight": q_w, "k_proj.weight": k_w, "v_proj.weight": v_w, "o_proj.weight": o_w}
    if bias:
        values.update({"q_proj.bias": q_b, "k_proj.bias": torch.zeros(n_kv_heads * hd),
                       "v_proj.bias": torch.zeros(n_kv_heads * hd),
                       "o_proj.bias": f.out_bias if f.out_bias is not None else torch.zeros(d)})
    return target.assign_parameters(values, like=layer)


def mha_to_mla(layer: Attention, kv_rank: int, q_rank: int | None = None, *,
               ignore_rope: bool = False, nope_fraction: float = 0.0) -> MultiHeadLatentAttention:
    """Initialize MLA (shared K/V latent of width ``kv_rank``) from MHA/GQA weights by truncated SVD.

    The latent W^DKV spans the leading eigenvectors of the key-side Gram of W plus the
    value-side Gram of W_tilde (each normalized by its trace, so both count equally);
    W^UK_i, W^UV_i re-express each head in it. With ``q_rank`` the query latent W^DQ spans
    the leading query-side (mode-2) subspace of W. Exact at kv_rank = q_rank = d_model.
    Zero or rank-deficient weights give finite factors. ``ignore_rope``: as for :func:`mha_to_gqa`.
    A head-RoPE source gets latent RoPE on a latent of key pairs (with the source's frequencies) and
    value directions (:func:`.rope.rope_mla`; kv_rank even, up to 2 d_model, exact when it holds them;
    ``nope_fraction``: partial RoPE).
    """
    if _check_source(layer, "mha_to_mla", ignore_rope):
        return rope_mla(layer, kv_rank, q_rank, nope_fraction=nope_fraction)
    if nope_fraction:
        raise ValueError(f"nope_fraction={nope_fraction} is partial RoPE, for a head-RoPE source")
    h, d = layer.n_heads, layer.d_model
    check_int("kv_rank", kv_rank, high=d)
    if q_rank is not None:
        check_int("q_rank", q_rank, high=d)
    f = attention_factors(layer, ignore_rope=ignore_rope)
    hd = f.pre.A.shape[2]
    if f.post.A.shape[2] != hd:
        raise ValueError(f"mha_to_mla needs equal per-head widths for W and W_tilde, got {hd} and "
                         f"{f.post.A.shape[2]}")
    bias = f.out_bias is not None or f.key_bias is not None
    target = MultiHeadLatentAttention(d, h, kv_rank, q_rank=q_rank, head_dim=hd, causal=layer.causal,
                                      dropout=layer.dropout, bias=bias, scale=layer.scale)
    key_gram, value_gram = f.pre.gram(3), f.post.gram(3)
    U = top_eigenvectors(_normalized(key_gram) + _normalized(value_gram), kv_rank)   # (d, kv_rank)
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
        q_b = (_query_bias(f.key_bias, f.pre.B) if f.key_bias is not None
               else torch.zeros(h, hd, dtype=torch.float64))
        values["q_up.bias"] = q_b.reshape(h * hd)
        values["o_proj.bias"] = f.out_bias if f.out_bias is not None else torch.zeros(d, dtype=torch.float64)
    return target.assign_parameters(values, like=layer)


@torch.no_grad()
def relative_error(reference: torch.nn.Module, approximation: torch.nn.Module, x: torch.Tensor) -> float:
    """||f(x) - g(x)|| / ||f(x)|| on inputs x (B, T, d): how far a converted layer's outputs move."""
    want = reference(x)
    return float((approximation(x) - want).norm() / want.norm())


def input_transform(layer: Attention, matrix: torch.Tensor, value_matrix: torch.Tensor | None = None) -> Attention:
    """The layer computing ``layer(x @ matrix)`` (matrix (d, d)): every weight acting on x absorbs it;
    with ``value_matrix`` the weights that feed only the values (``layer.value_inputs()``) absorb that
    one instead (the layer then computes values of ``x @ value_matrix``).

    With ``matrix = S = Sigma^{1/2}`` (Sigma = E[x^T x] of real inputs) a conversion done on the
    transformed layer minimizes the error on those inputs (activation-aware truncation:
    ||S (W - W_hat) S||_F for W, ||(W_tilde - W_tilde_hat) S||_F for W_tilde); ``S^{-1}`` maps back.
    A value error reaches the output through the attention-mixed inputs z_m = sum_n a_mn x_n, so
    ``value_matrix`` = the square root of their second moment weighs W_tilde by what it acts on.
    """
    check_finite(layer)
    d = layer.d_model
    for name, given in (("matrix", matrix), ("value_matrix", value_matrix)):
        if (given is not None or name == "matrix") and (not isinstance(given, torch.Tensor)
                                                        or tuple(given.shape) != (d, d)):
            raise ValueError(f"{name} must be (d_model, d_model) = ({d}, {d}), got "
                             f"{tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__}")
    ref = next(layer.parameters())
    M = matrix.detach().to(device=ref.device, dtype=torch.float64)
    V = M if value_matrix is None else value_matrix.detach().to(device=ref.device, dtype=torch.float64)
    values = set(layer.value_inputs())
    new = copy.deepcopy(layer).to(torch.float64)
    with torch.no_grad():
        for name, kind in layer.input_weights().items():
            p, m = new.get_parameter(name), V if name in values else M
            p.copy_(p @ m.T if kind == "linear" else m @ p)       # Linear (out, d): (xM) W^T; factor (d, r): (xM) U
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
