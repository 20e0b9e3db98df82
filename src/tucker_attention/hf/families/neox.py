"""``neox``: fused ``query_key_value`` laid out per head [h, 3, head_dim] and ``dense``, partial head RoPE
over ``rotary_ndims`` (GPT-NeoX / Pythia)."""

from __future__ import annotations

from torch import nn

from .common import GQAFamily, Projections, dropout_p, head_dim_of
from .registry import register


class NeoX(GQAFamily):
    name = "neox"
    description = "fused query_key_value per head [h, 3, head_dim] and dense, partial RoPE"
    tested_on = ("GPTNeoXAttention",)
    linears = ("query_key_value", "dense")
    head_rope = True

    def projections(self, module: nn.Module, parent: nn.Module | None) -> Projections:
        head_dim = head_dim_of(module, module.config, module.dense.in_features)
        heads = module.query_key_value.out_features // (3 * head_dim)
        w = module.query_key_value.weight.detach().view(heads, 3, head_dim, -1)
        b = module.query_key_value.bias
        b = b.detach().view(heads, 3, head_dim) if b is not None else None
        weights = [(w[:, i].reshape(heads * head_dim, -1), None if b is None else b[:, i].reshape(-1))
                   for i in range(3)] + [(module.dense.weight.detach(), module.dense.bias)]
        return Projections(weights, head_dim, dropout_p(getattr(module, "attention_dropout", 0.0)),
                           rope_dim=getattr(module, "rotary_ndims", None))


register(NeoX())
