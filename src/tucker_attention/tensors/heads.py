"""The exact :class:`~tucker_attention.layers.TuckerHeadsAttention` form of a GQA layer with per-head
q/k norms (:func:`to_tucker_heads`); :func:`truncate_heads` lowers its ranks
(:mod:`tucker_attention.layers.tucker_heads_ranks`, what ``TuckerHeadsAttention.truncated`` runs).
"""

from __future__ import annotations

import torch

from ..layers import Attention, TuckerHeadsAttention
from ..layers.tucker_heads_ranks import truncate_heads  # noqa: F401  (re-exported)
from .exact import exact_pair


def heads_form_applies(layer) -> bool:
    """Whether ``layer`` has per-head q/k norms that :func:`to_tucker_heads` keeps
    (``layer.keeps_key_heads()``)."""
    return layer.keeps_key_heads()


def to_tucker_heads(layer: Attention) -> TuckerHeadsAttention:
    """The exact TuckerHeadsAttention of a layer with per-head q/k norms (``layer.key_heads_form()``;
    a GQA / MQA / MHA layer: q/k norms and head RoPE kept): U1 = I, and the query / key projections as
    U2 / U3 with selecting cores when they are narrower than d_model (else U2 / U3 = I); the value
    side is the layer's exact Tucker value pair."""
    form = layer.key_heads_form()
    d, h, g, width = layer.d_model, layer.n_heads, form["key_heads"], form["head_dim"]
    core, U2 = _stacked(form["query"], h, width, d)                            # (H, r2, D), (d, r2)
    key_up, U3 = _stacked(form["key"], g, width, d)                            # (Hkv, r3, D), (d, r3)
    post_core, (U1_t, U2_t, U3_t) = exact_pair(*layer.linearized().exact_tucker()["post"])   # widths <= d
    values = {"core": core, "U1": torch.eye(h, dtype=torch.float64), "U2": U2, "U3": U3, "key_up": key_up,
              "core_tilde": post_core, "U1_tilde": U1_t, "U2_tilde": U2_t, "U3_tilde": U3_t,
              "q_norm.weight": form["q_gain"], "k_norm.weight": form["k_gain"],
              "head_scale": torch.ones(h, dtype=torch.float64)}
    return TuckerHeadsAttention.holding(layer, (h, U2.shape[1], U3.shape[1]), tuple(post_core.shape), values,
                                        key_heads=g, head_dim=width, norm_eps=form["norm_eps"])


def _stacked(weight: torch.Tensor, heads: int, width: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head core (heads, r, width), factor (d, r)) with factor @ core[i] = the head's rows of ``weight``
    (heads*width, d) transposed: the factor is the weight itself and the core selects (r = heads*width)
    when that is at most d, else the factor is I (r = d) and the core holds the weight."""
    if heads * width <= d:
        select = torch.eye(heads * width, dtype=torch.float64).view(heads * width, heads, width).transpose(0, 1)
        return select.contiguous(), weight.T.contiguous()
    return weight.view(heads, width, d).transpose(1, 2).contiguous(), torch.eye(d, dtype=torch.float64)


