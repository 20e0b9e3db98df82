"""The exact Tucker form of any layer (PAPER.md §4, Thms. B.2-B.4), RoPE included (§5)."""

from __future__ import annotations

import torch

from ..layers import Attention, TuckerAttention
from .view import attention_factors, check_finite


def _fit_width(U: torch.Tensor, core: torch.Tensor, mode: int):
    """Keep a factor at most d columns wide: U = Q R (reduced QR), R moved into the core."""
    if U.shape[1] <= U.shape[0]:
        return U, core
    Q, R = torch.linalg.qr(U)
    return Q, torch.movedim(torch.tensordot(R, core, dims=([1], [mode - 1])), 0, mode - 1)


def exact_pair(core, factors, fixed: bool = False):
    """(core, (U1, U2, U3)) of an exact form with U2 (and U3, unless ``fixed``: RoPE pairs or normed dims)
    at most d_model wide (:func:`_fit_width`); the product is unchanged."""
    U1, U2, U3 = factors
    U2, core = _fit_width(U2, core, 2)
    if not fixed:           # a RoPE latent keeps its pairs (a QR would mix frequencies), a normed one its dims
        U3, core = _fit_width(U3, core, 3)
    return core, (U1, U2, U3)


def to_tucker(layer: Attention) -> TuckerAttention:
    """The exact Tucker form of a layer (PAPER.md §4, Thms. B.2-B.4); outputs are unchanged.

    Each layer gives its own form (``layer.exact_tucker()``): MHA/GQA/MQA route each head to
    its key group (ranks (h, h*hd, n_kv*hd)); MLA absorbs its up-projections into the core (a
    shared latent stays shared); Tucker is itself. RoPE stays exact as latent RoPE whose pairs
    carry the source's frequencies: head RoPE (full or partial) stacks each key head's pairs,
    MLA's coupled RoPE keeps its latent, its decoupled RoPE joins the latent as rotated pairs
    (:mod:`tucker_attention.layers.rope_pairs`). A factor wider than d_model is first reduced by
    a QR step (still exact; not the RoPE latent). Non-finite weights are refused.
    """
    if not isinstance(layer, Attention):
        raise TypeError(f"layer must be a tucker_attention attention layer, got {type(layer).__name__}")
    check_finite(layer)
    form = layer.exact_tucker()
    rope = form["rope"] is not None
    fixed = rope or "qk_norm" in form                  # the latent's coordinates are the RoPE pairs / normed dims
    if "out_bias" in form:                             # a non-linear layer (norms kept) gives its biases itself
        key_bias, out_bias = None, form["out_bias"]
    else:
        factors = attention_factors(layer, ignore_rope=rope)
        key_bias, out_bias = (None if "q_bias" in form else factors.key_bias), factors.out_bias
    return TuckerAttention.from_factors(layer, exact_pair(*form["pre"], fixed), exact_pair(*form["post"], fixed),
                                        key_bias=key_bias, q_bias=form.get("q_bias"), k_bias=form.get("k_bias"),
                                        out_bias=out_bias, shared_kv=form["shared_kv"], rope=form["rope"],
                                        rope_freqs=form.get("rope_freqs"), qk_norm=form.get("qk_norm"))
