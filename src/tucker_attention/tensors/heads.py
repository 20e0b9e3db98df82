"""The exact :class:`~tucker_attention.layers.TuckerHeadsAttention` form of a GQA layer with per-head
q/k norms (:func:`to_tucker_heads`); :func:`truncate_heads` lowers its ranks
(:mod:`tucker_attention.layers.tucker_heads_ranks`, what ``TuckerHeadsAttention.truncated`` runs).
"""

from __future__ import annotations

import torch

from ..layers import GroupedQueryAttention, TuckerHeadsAttention
from ..layers.tucker_heads_ranks import truncate_heads  # noqa: F401  (re-exported)
from .exact import _exact_pair


def heads_form_applies(layer) -> bool:
    """Whether ``layer`` has per-head q/k norms that :func:`to_tucker_heads` keeps (a GQA layer with
    them, no projection biases, RoPE none or on whole heads)."""
    return (isinstance(layer, GroupedQueryAttention) and layer.q_norm is not None
            and not any(name.endswith("bias") for name, _ in layer.named_parameters())
            and layer.rope in (None, "head") and layer.config().get("rope_dim") in (None, layer.head_dim))


def to_tucker_heads(layer: GroupedQueryAttention) -> TuckerHeadsAttention:
    """The exact TuckerHeadsAttention of a GQA / MQA / MHA layer (q/k norms and head RoPE kept): U1 = I,
    and the query / key projections as U2 / U3 with selecting cores when they are narrower than
    d_model (else U2 / U3 = I); the value side is the layer's exact Tucker value pair."""
    if not isinstance(layer, GroupedQueryAttention):
        raise TypeError(f"to_tucker_heads takes a GroupedQueryAttention (gqa / mqa / mha), got {type(layer).__name__}")
    if any(name.endswith("bias") for name, _ in layer.named_parameters()):
        raise ValueError("to_tucker_heads: a layer with projection biases is not supported (TuckerHeadsAttention "
                         "has none)")
    rope_dim = layer.config().get("rope_dim")
    if layer.rope not in (None, "head") or (rope_dim is not None and rope_dim != layer.head_dim):
        raise ValueError(f"to_tucker_heads keeps RoPE on whole heads; this layer has rope={layer.rope!r}, "
                         f"rope_dim={rope_dim} of head_dim={layer.head_dim}")
    p = {name: t.detach().to("cpu", torch.float64) for name, t in layer.named_parameters()}
    d, h, g, width = layer.d_model, layer.n_heads, layer.n_kv_heads, layer.head_dim
    core, U2 = _stacked(p["q_proj.weight"], h, width, d)                       # (H, r2, D), (d, r2)
    key_up, U3 = _stacked(p["k_proj.weight"], g, width, d)                     # (Hkv, r3, D), (d, r3)
    post_core, (U1_t, U2_t, U3_t) = _exact_pair(*layer.linearized().exact_tucker()["post"])   # widths <= d
    values = {"core": core, "U1": torch.eye(h, dtype=torch.float64), "U2": U2, "U3": U3, "key_up": key_up,
              "core_tilde": post_core, "U1_tilde": U1_t, "U2_tilde": U2_t, "U3_tilde": U3_t}
    if layer.q_norm is not None:
        values["q_norm.weight"], values["k_norm.weight"] = p["q_norm.weight"], p["k_norm.weight"]
        values["head_scale"] = torch.ones(h, dtype=torch.float64)
    return TuckerHeadsAttention.holding(layer, (h, U2.shape[1], U3.shape[1]), tuple(post_core.shape), values)


def _stacked(weight: torch.Tensor, heads: int, width: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head core (heads, r, width), factor (d, r)) with factor @ core[i] = the head's rows of ``weight``
    (heads*width, d) transposed: the factor is the weight itself and the core selects (r = heads*width)
    when that is at most d, else the factor is I (r = d) and the core holds the weight."""
    if heads * width <= d:
        select = torch.eye(heads * width, dtype=torch.float64).view(heads * width, heads, width).transpose(0, 1)
        return select.contiguous(), weight.T.contiguous()
    return weight.view(heads, width, d).transpose(1, 2).contiguous(), torch.eye(d, dtype=torch.float64)


