"""tucker-attention: Tucker Attention and the attention layers it generalizes (MHA, GQA/MQA, MLA).

Paper: Klein, Kusch, Sager, Schnake, Schotthöfer, "Tucker Attention: A generalization of
approximate attention mechanisms", arXiv 2603.30033 (2026).
"""

from .accounting import attention_param_count, kv_cache_bytes_per_token, kv_cache_floats_per_token
from .layers import (
    Attention,
    GroupedQueryAttention,
    KVCache,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    MultiQueryAttention,
    TuckerAttention,
    TuckerHeadsAttention,
    make_attention,
)

__version__ = "0.2.0"

__all__ = ["Attention", "GroupedQueryAttention", "KVCache", "MultiHeadAttention", "MultiHeadLatentAttention",
           "MultiQueryAttention", "TuckerAttention", "TuckerHeadsAttention", "attention_param_count",
           "kv_cache_bytes_per_token", "kv_cache_floats_per_token", "make_attention"]
