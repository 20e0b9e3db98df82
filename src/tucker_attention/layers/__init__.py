"""Attention layers behind one interface: ``layer(x, *, cache=None, attn_mask=None, positions=None, rope=None)``."""

from __future__ import annotations

from .base import ATTENTION_METHODS, Attention, frozen_weights
from .cache import CacheProtocol, KVCache
from .factors import AttentionFactors, HeadFactors
from .gqa import GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention
from .mla import MultiHeadLatentAttention
from .rope import RopeTables, RotaryEmbedding, apply_rope
from .sdpa import attend
from .tucker import TuckerAttention
from .tucker_heads import TuckerHeadsAttention


def make_attention(method: str, d_model: int, n_heads: int, **kwargs) -> Attention:
    """Build a layer by name (``'mha' | 'gqa' | 'mqa' | 'mla' | 'tucker'``, or any registered
    subclass's ``method``) with its own arguments.

    >>> make_attention("tucker", 768, 12, ranks=(8, 128, 64), causal=True)  # doctest: +SKIP
    """
    if method not in ATTENTION_METHODS:
        raise ValueError(f"method must be one of {sorted(ATTENTION_METHODS)}, got {method!r}")
    return ATTENTION_METHODS[method](d_model, n_heads, **kwargs)


__all__ = ["ATTENTION_METHODS", "Attention", "AttentionFactors", "CacheProtocol", "GroupedQueryAttention",
           "HeadFactors", "KVCache", "MultiHeadAttention", "MultiHeadLatentAttention", "MultiQueryAttention",
           "RopeTables", "RotaryEmbedding", "TuckerAttention", "TuckerHeadsAttention", "apply_rope", "attend",
           "frozen_weights", "make_attention"]
