"""Attention layers behind one interface: ``layer(x, *, cache=None, attn_mask=None, positions=None)``."""

from __future__ import annotations

from .base import Attention, attend
from .cache import KVCache
from .gqa import GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention
from .mla import MultiHeadLatentAttention
from .rope import RotaryEmbedding, apply_rope
from .tucker import TuckerAttention

ATTENTION_METHODS = {cls.method: cls for cls in (MultiHeadAttention, GroupedQueryAttention, MultiQueryAttention,
                                                  MultiHeadLatentAttention, TuckerAttention)}


def make_attention(method: str, d_model: int, n_heads: int, **kwargs) -> Attention:
    """Build a layer by name (``'mha' | 'gqa' | 'mqa' | 'mla' | 'tucker'``) with its own arguments.

    >>> make_attention("tucker", 768, 12, ranks=(8, 128, 64), causal=True)  # doctest: +SKIP
    """
    if method not in ATTENTION_METHODS:
        raise ValueError(f"method must be one of {sorted(ATTENTION_METHODS)}, got {method!r}")
    return ATTENTION_METHODS[method](d_model, n_heads, **kwargs)


__all__ = ["ATTENTION_METHODS", "Attention", "GroupedQueryAttention", "KVCache", "MultiHeadAttention",
           "MultiHeadLatentAttention", "MultiQueryAttention", "RotaryEmbedding", "TuckerAttention",
           "apply_rope", "attend", "make_attention"]
