"""The tensor view of an attention layer (PAPER.md §1).

Every layer here is, per head i, a pair of bilinear forms of rank <= k:

    W[i]       = A_i B_i^T    (d x d)   logits_i = scale * x W[i] x^T          A_i query side, B_i key side
    W_tilde[i] = C_i D_i^T    (d x d)   y = sum_i softmax_i (x W_tilde[i]^T)   C_i output side, D_i value side

so W[i] = W^Q_i W^K_i^T and W_tilde[i] = (W^V_i W^O_i)^T. :class:`HeadFactors` keeps the
(A, B) pairs, which is all that the Gram matrices of the unfoldings need (e.g. mode 2:
sum_i A_i (B_i^T B_i) A_i^T): ranks, spectra and truncated HOSVD/HOOI of large layers
never materialize an (h x d x d) tensor. Biases enter as ``key_bias`` (h, d): the query
bias seen from the key side, logits_i += key_bias_i . x_n; and ``out_bias`` (d): output
bias plus every value bias passed through softmax. A key bias cancels in softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import Attention, GroupedQueryAttention, MultiHeadLatentAttention, TuckerAttention
from .algebra import TuckerTensor, _check_ranks, mode_product, top_eigenvectors, unfold


def _sum_over_heads(X: torch.Tensor, Y: torch.Tensor, middle: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i X_i M_i Y_i^T for X (h, p, k), Y (h, q, k), M (h, k, k) or identity.

    Accumulated head by head: no (p, h*k) copy, so peak memory stays at one (p, q) Gram.
    """
    out = torch.zeros(X.shape[1], Y.shape[1], dtype=X.dtype, device=X.device)
    for i in range(X.shape[0]):
        out.addmm_(X[i] if middle is None else X[i] @ middle[i], Y[i].T)
    return out


@dataclass(frozen=True)
class HeadFactors:
    """T[i] = A[i] @ B[i]^T for every head i: A (h, d_row, k), B (h, d_col, k)."""
    A: torch.Tensor
    B: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.A.shape[0], self.A.shape[1], self.B.shape[1]

    def dense(self) -> torch.Tensor:
        """The (h, d_row, d_col) tensor itself."""
        return self.A @ self.B.mT

    def norm_squared(self) -> torch.Tensor:
        """||T||_F^2 = sum_i tr((A_i^T A_i)(B_i^T B_i))."""
        return (self.A.mT @ self.A * (self.B.mT @ self.B)).sum()

    def gram(self, mode: int) -> torch.Tensor:
        """unfold(T, mode) @ unfold(T, mode)^T from the factors."""
        A, B = self.A, self.B
        if mode == 1:
            h, k = A.shape[0], A.shape[2]
            a = A.permute(1, 0, 2).reshape(A.shape[1], h * k)
            b = B.permute(1, 0, 2).reshape(B.shape[1], h * k)
            return ((a.T @ a) * (b.T @ b)).view(h, k, h, k).sum((1, 3))
        if mode == 2:
            return _sum_over_heads(A, A, B.mT @ B)
        if mode == 3:
            return _sum_over_heads(B, B, A.mT @ A)
        raise ValueError(f"mode must be 1, 2 or 3, got {mode!r}")

    def spectra(self) -> list[torch.Tensor]:
        """Singular values of the three unfoldings (from the Gram eigenvalues), descending."""
        return [torch.linalg.eigvalsh(self.gram(m)).flip(0).clamp(min=0).sqrt() for m in (1, 2, 3)]


@dataclass(frozen=True)
class AttentionFactors:
    """A layer in tensor form: ``pre`` gives W, ``post`` gives W_tilde, plus its biases."""
    pre: HeadFactors
    post: HeadFactors
    key_bias: torch.Tensor | None
    out_bias: torch.Tensor | None


def _blocks(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A Linear weight (heads * hd, n) -> per-head (heads, n, hd): x @ result[i] is head i's output."""
    return weight.view(heads, -1, weight.shape[-1]).mT


def _check_finite(layer: Attention) -> None:
    for name, p in layer.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"layer weight {name!r} has non-finite values (NaN or inf)")


def attention_factors(layer: Attention, *, ignore_rope: bool = False, dtype=torch.float64) -> AttentionFactors:
    """Per-head factors of W and W_tilde for any of the four layer types (in ``dtype``).

    With RoPE the logits also depend on positions, so W is only the weight at offset 0;
    that is refused unless ``ignore_rope=True`` (e.g. to study the weights' ranks).
    """
    if not isinstance(layer, Attention):
        raise TypeError(f"layer must be a tucker_attention attention layer (MultiHeadAttention, GroupedQuery"
                        f"Attention, MultiHeadLatentAttention, TuckerAttention), got {type(layer).__name__}")
    if layer.rotary is not None and not ignore_rope:
        raise ValueError(f"{type(layer).__name__} uses RoPE, so its logits depend on positions and no fixed "
                         f"tensor W reproduces them; pass ignore_rope=True for the weights at offset 0")
    _check_finite(layer)
    p = {name: t.detach().to(dtype) for name, t in layer.named_parameters()}
    h = layer.n_heads
    if isinstance(layer, GroupedQueryAttention):
        group = torch.arange(h, device=p["q_proj.weight"].device) // (h // layer.n_kv_heads)
        per_head = (lambda t: t) if layer.n_kv_heads == h else (lambda t: t[group])   # no copy for MHA
        A, B = _blocks(p["q_proj.weight"], h), per_head(_blocks(p["k_proj.weight"], layer.n_kv_heads))
        C, D = _blocks(p["o_proj.weight"].T, h), per_head(_blocks(p["v_proj.weight"], layer.n_kv_heads))
        key_bias = out_bias = None
        if "q_proj.bias" in p:
            key_bias = torch.einsum("idk,ik->id", B, p["q_proj.bias"].view(h, -1))
            v_bias = p["v_proj.bias"].view(layer.n_kv_heads, -1)[group]
            out_bias = p["o_proj.bias"] + torch.einsum("idk,ik->d", C, v_bias)
        return AttentionFactors(HeadFactors(A, B), HeadFactors(C, D), key_bias, out_bias)
    if isinstance(layer, MultiHeadLatentAttention):
        if layer.kv_norm is not None or layer.q_norm is not None:
            raise ValueError("MultiHeadLatentAttention with latent_norm=True is not linear in x, so it has no "
                             "attention tensors; use latent_norm=False")
        d = layer.d_model
        w_dq = p["q_down.weight"].T if layer.q_down is not None else torch.eye(d, dtype=dtype)
        w_dkv = p["kv_down.weight"].T
        w_dk, w_dv = (w_dkv, w_dkv) if layer.shared_kv else w_dkv.split(layer.kv_rank, dim=1)
        A = w_dq @ _blocks(p["q_up.weight"], h)                                   # (h, d, hd)
        B = w_dk @ _blocks(p["k_up.weight"], h)
        if layer.rope == "decoupled":                                              # offset-0 RoPE term
            A = torch.cat([A, w_dq @ _blocks(p["q_rope.weight"], h)], dim=-1)
            B = torch.cat([B, p["k_rope.weight"].T.expand(h, -1, -1)], dim=-1)
        C, D = _blocks(p["o_proj.weight"].T, h), w_dv @ _blocks(p["v_up.weight"], h)
        key_bias = out_bias = None
        if "q_up.bias" in p:
            bq = p["q_up.bias"].view(h, -1)
            key_bias = torch.einsum("idk,ik->id", B[..., :bq.shape[1]], bq)
            out_bias = p["o_proj.bias"]
        return AttentionFactors(HeadFactors(A, B), HeadFactors(C, D), key_bias, out_bias)
    if isinstance(layer, TuckerAttention):
        G, G_tilde = (torch.einsum("hc,cab->hab", p[u], p[c]) for u, c in (("U1", "core"), ("U1_tilde", "core_tilde")))
        U3 = p["U3"]
        U3_tilde = U3 if layer.shared_kv else p["_U3_tilde"]
        A, B = p["U2"] @ G, U3.expand(h, -1, -1)
        C, D = p["U2_tilde"] @ G_tilde, U3_tilde.expand(h, -1, -1)
        key_bias = p["q_bias"] @ U3.T if "q_bias" in p else None
        return AttentionFactors(HeadFactors(A, B), HeadFactors(C, D), key_bias, p.get("out_bias"))
    raise TypeError(f"no tensor view for {type(layer).__name__}")


def attention_tensors(layer: Attention, *, ignore_rope: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, W_tilde)``, each (n_heads, d_model, d_model), PAPER.md §1 orientation.

    W[i] = W^Q_i W^K_i^T and W_tilde[i] = (W^V_i W^O_i)^T, so for a layer without RoPE or
    biases ``y = sum_i softmax(scale * x W[i] x^T) (x W_tilde[i]^T)`` is its forward. Biases
    are not part of the tensors (see :func:`attention_factors`). Returned in the layer's dtype.
    """
    dtype = next(layer.parameters()).dtype if isinstance(layer, torch.nn.Module) else torch.float64
    f = attention_factors(layer, ignore_rope=ignore_rope, dtype=torch.float64)
    return f.pre.dense().to(dtype), f.post.dense().to(dtype)


def factored_hosvd(factors: HeadFactors, ranks, *, method: str = "hosvd", n_iter: int = 10) -> TuckerTensor:
    """Truncated Tucker decomposition of T[i] = A_i B_i^T without forming T.

    Sequentially truncated HOSVD in mode order 2, 3, 1 (the large modes first, from
    factor Grams; mode 1 on the small projected core), optionally refined by HOOI sweeps
    whose mode-2/3 updates use (r1, d, r3)-sized projections. Returns the Tucker tensor with
    orthonormal factors; equals ``hosvd(T.dense(), ranks, order=(2, 3, 1))``.
    """
    if method not in ("hosvd", "hooi"):
        raise ValueError(f"method must be 'hosvd' or 'hooi', got {method!r}")
    r1, r2, r3 = _check_ranks(factors.shape, ranks)
    A, B = factors.A, factors.B
    U2 = top_eigenvectors(factors.gram(2), r2)
    A2 = U2.T @ A                                                     # (h, r2, k)
    U3 = top_eigenvectors(HeadFactors(A2, B).gram(3), r3)
    small = A2 @ (U3.T @ B).mT                                        # (h, r2, r3)
    U1 = top_eigenvectors(unfold(small, 1) @ unfold(small, 1).T, r1)
    best = TuckerTensor(mode_product(small, U1.T, 1), (U1, U2, U3))
    if method == "hosvd":
        return best
    for _ in range(n_iter):
        # mode 2: Y[c] = sum_i U1[i, c] A_i (U3^T B_i)^T, (r1, d, r3); then mode 3 likewise
        Y = torch.einsum("ic,ipq->cpq", U1, A @ (U3.T @ B).mT)
        U2 = top_eigenvectors(_sum_over_heads(Y, Y), r2)
        Y = torch.einsum("ic,iqp->cqp", U1, B @ (U2.T @ A).mT)             # (r1, d, r2)
        U3 = top_eigenvectors(_sum_over_heads(Y, Y), r3)
        small = (U2.T @ A) @ (U3.T @ B).mT
        U1 = top_eigenvectors(unfold(small, 1) @ unfold(small, 1).T, r1)
        core = mode_product(small, U1.T, 1)
        if core.norm() > best.core.norm():
            best = TuckerTensor(core, (U1, U2, U3))
    return best
