"""The tensor view of an attention layer (PAPER.md §1): tensors, factors and their truncation.

Every layer describes itself as per-head factor pairs (``layer.tensor_view()``, see
:mod:`tucker_attention.layers.factors`): W[i] = A_i B_i^T and W_tilde[i] = C_i D_i^T. The
Gram matrices of the unfoldings need only those pairs, so ranks, spectra and truncated
HOSVD/HOOI of large layers never materialize an (h x d x d) tensor.
"""

from __future__ import annotations

import torch

from ..layers import Attention
from ..layers.factors import AttentionFactors, HeadFactors, sum_over_heads
from .algebra import TuckerTensor, check_mode_ranks, mode_product, top_eigenvectors, unfold

__all__ = ["AttentionFactors", "HeadFactors", "attention_factors", "attention_tensors", "check_finite",
           "factored_hosvd", "key_side_basis"]


def check_finite(layer: Attention) -> None:
    """Refuse a layer with NaN or inf weights (every converter calls this first)."""
    for name, p in layer.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"layer weight {name!r} has non-finite values (NaN or inf)")


def attention_factors(layer: Attention, *, ignore_rope: bool = False, dtype=torch.float64) -> AttentionFactors:
    """Per-head factors of W and W_tilde of any layer that describes them (``layer.tensor_view()``).

    With RoPE the logits also depend on positions, so W is only the weight at offset 0;
    that is refused unless ``ignore_rope=True`` (e.g. to study the weights' ranks).
    Non-finite weights are refused.
    """
    if not isinstance(layer, Attention):
        raise TypeError(f"layer must be a tucker_attention attention layer (MultiHeadAttention, GroupedQuery"
                        f"Attention, MultiHeadLatentAttention, TuckerAttention or another Attention subclass), "
                        f"got {type(layer).__name__}")
    if layer.rope is not None and not ignore_rope:
        raise ValueError(f"{type(layer).__name__} uses RoPE, so its logits depend on positions and no fixed "
                         f"tensor W reproduces them; pass ignore_rope=True for the weights at offset 0")
    check_finite(layer)
    return layer.tensor_view(dtype)


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
    r1, r2, r3 = check_mode_ranks(factors.shape, ranks)
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
        U2 = top_eigenvectors(sum_over_heads(Y, Y), r2)
        Y = torch.einsum("ic,iqp->cqp", U1, B @ (U2.T @ A).mT)             # (r1, d, r2)
        U3 = top_eigenvectors(sum_over_heads(Y, Y), r3)
        small = (U2.T @ A) @ (U3.T @ B).mT
        U1 = top_eigenvectors(unfold(small, 1) @ unfold(small, 1).T, r1)
        core = mode_product(small, U1.T, 1)
        if core.norm() > best.core.norm():
            best = TuckerTensor(core, (U1, U2, U3))
    return best


def key_side_basis(factors: HeadFactors, heads: torch.Tensor, rank: int) -> torch.Tensor:
    """Best common rank-``rank`` key-side (mode-3) subspace of the given heads, (d, rank).

    Minimizes sum_{i in heads} ||T[i] - T[i] P P^T||_F^2: the leading eigenvectors of
    sum_i B_i (A_i^T A_i) B_i^T, the Gram of those heads' mode-3 unfolding.
    """
    return top_eigenvectors(HeadFactors(factors.A[heads], factors.B[heads]).gram(3), rank)
