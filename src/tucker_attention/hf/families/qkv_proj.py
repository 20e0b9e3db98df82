"""``qkv_proj``: fused ``qkv_proj`` laid out [q | k | v] and ``o_proj``, head RoPE (Phi-3)."""

from __future__ import annotations

from torch import nn

from .common import GQAFamily, Projections, dropout_p, head_dim_of, split_bias
from .registry import register


class FusedQKV(GQAFamily):
    name = "qkv_proj"
    description = "fused qkv_proj [q | k | v] and o_proj"
    tested_on = ("Phi3Attention",)
    linears = ("qkv_proj", "o_proj")
    head_rope = True

    def projections(self, module: nn.Module, parent: nn.Module | None) -> Projections:
        q_width = module.o_proj.in_features
        kv_width = (module.qkv_proj.out_features - q_width) // 2
        sizes = [q_width, kv_width, kv_width]
        ws, bs = module.qkv_proj.weight.detach().split(sizes), split_bias(module.qkv_proj.bias, sizes)
        return Projections([*zip(ws, bs), (module.o_proj.weight.detach(), module.o_proj.bias)],
                           head_dim_of(module, module.config, q_width),
                           dropout_p(getattr(module, "attention_dropout", 0.0)))


register(FusedQKV())
