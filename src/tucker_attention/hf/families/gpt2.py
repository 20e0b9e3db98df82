"""``gpt2``: fused ``c_attn`` (Conv1D, d -> 3d) and ``c_proj`` (GPT-2)."""

from __future__ import annotations

import torch
from torch import nn

from .common import GQAFamily, Projections, dropout_p, split_bias
from .registry import Unsupported, register


def _conv1d(module: nn.Module, name: str) -> bool:
    part = getattr(module, name, None)
    return isinstance(part, nn.Module) and type(part).__name__ == "Conv1D" and isinstance(
        getattr(part, "weight", None), torch.Tensor)


class GPT2(GQAFamily):
    name = "gpt2"
    description = "fused Conv1D c_attn and c_proj"
    tested_on = ("GPT2Attention",)
    parts = frozenset({"c_attn", "c_proj"})

    def matches(self, module: nn.Module) -> bool:
        return _conv1d(module, "c_attn") and _conv1d(module, "c_proj")

    def projections(self, module: nn.Module, parent: nn.Module | None) -> Projections:
        d = module.config.hidden_size
        w, b = module.c_attn.weight.detach().T, module.c_attn.bias        # Conv1D: y = x W + b, W (d, 3d)
        if w.shape[0] != 3 * d:
            raise Unsupported(f"its c_attn maps {w.shape[1]} -> {w.shape[0]}, not d -> 3d (cross-attention?)")
        (wq, wk, wv), (bq, bk, bv) = w.split(d, dim=0), split_bias(b, [d] * 3)
        weights = [(wq, bq), (wk, bk), (wv, bv), (module.c_proj.weight.detach().T, module.c_proj.bias)]
        return Projections(weights, int(module.head_dim), dropout_p(module.attn_dropout),
                           dropout_p(getattr(module, "resid_dropout", 0.0)))


register(GPT2())
