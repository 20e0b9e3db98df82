"""``proj``: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with optional per-head RMSNorms ``q_norm``, ``k_norm``
before RoPE (gain w, or 1 + w as Gemma's, found by probing the norm), GQA, head_dim != d/h, the block's
own ``scaling`` (Gemma's ``query_pre_attn_scalar``) and head RoPE (full or partial) from the model's
``position_embeddings`` (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, SmolLM3's NoPE layers, ViT without RoPE)."""

from __future__ import annotations

from torch import nn

from .common import GQAFamily, Projections, dropout_p, head_dim_of, weight_and_bias
from .registry import register


class Proj(GQAFamily):
    name = "proj"
    description = "q_proj/k_proj/v_proj/o_proj, optional per-head q_norm/k_norm, head RoPE (full or partial)"
    tested_on = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "Gemma2Attention",
                 "Gemma3Attention", "SmolLM3Attention", "ViTAttention")
    linears = ("q_proj", "k_proj", "v_proj", "o_proj")
    parts = frozenset({*linears, "q_norm", "k_norm"})
    head_rope = True

    def projections(self, module: nn.Module, parent: nn.Module | None) -> Projections:
        return Projections([weight_and_bias(getattr(module, name)) for name in self.linears],
                           head_dim_of(module, module.config, module.q_proj.out_features),
                           dropout_p(getattr(module, "attention_dropout", 0.0)),
                           norms=(getattr(module, "q_norm", None), getattr(module, "k_norm", None)))


register(Proj())
