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


def _exact_pair(core, factors, rope: bool = False):
    U1, U2, U3 = factors
    U2, core = _fit_width(U2, core, 2)
    if not rope:                        # a RoPE latent keeps its pairs (a QR would mix frequencies)
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
    factors = attention_factors(layer, ignore_rope=rope)
    return TuckerAttention.from_factors(layer, _exact_pair(*form["pre"], rope), _exact_pair(*form["post"], rope),
                                        key_bias=None if "q_bias" in form else factors.key_bias,
                                        q_bias=form.get("q_bias"), k_bias=form.get("k_bias"),
                                        out_bias=factors.out_bias, shared_kv=form["shared_kv"], rope=form["rope"],
                                        rope_freqs=form.get("rope_freqs"))
