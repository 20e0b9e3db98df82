"""The single scaled-dot-product-attention call every layer makes, and its mask check.

Shape legend: B batch, T query length, S key length, H query heads, Hkv key/value heads,
D query/key width, Dv value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def check_mask(attn_mask, batch: int, heads: int, q_len: int, k_len: int) -> None:
    allowed = f"(1 or {batch}, 1 or {heads}, 1 or {q_len}, {k_len})"
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a bool torch.Tensor of shape {allowed} (True = attend) or None, "
                        f"got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be a bool tensor (True = attend), got dtype {attn_mask.dtype}")
    shape = tuple(attn_mask.shape)
    if (attn_mask.dim() != 4 or shape[0] not in (1, batch) or shape[1] not in (1, heads)
            or shape[2] not in (1, q_len) or shape[3] != k_len):
        raise ValueError(f"attn_mask must have shape {allowed}, got {shape}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
           attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention through ``F.scaled_dot_product_attention``.

    q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> (B, H, T, Dv), H % Hkv == 0.
    The T queries are the last T of the S positions, so ``causal`` aligns them lower-right
    (a single decode token sees every key). ``attn_mask`` (bool, True = attend) broadcasts
    as (1|B, 1|H, 1|T, S). K/V are never copied per head: with Hkv == 1 and no per-query
    mask the heads fold into the query length (exact: one matrix product per head group);
    otherwise SDPA's ``enable_gqa`` is used (``repeat_interleave`` on torch < 2.5).
    """
    batch, heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if attn_mask is not None:
        check_mask(attn_mask, batch, heads, q_len, k_len)
    is_causal, mask = False, attn_mask
    if causal and q_len > 1:
        if attn_mask is None:
            is_causal = q_len == k_len
            mask = None if is_causal else causal_lower_right(q_len, k_len)
        else:
            rows = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
            mask = attn_mask & (torch.arange(k_len, device=q.device) <= rows)
    if kv_heads == 1 and heads > 1 and not is_causal and (mask is None or (
            isinstance(mask, torch.Tensor) and mask.shape[1] == 1 and mask.shape[2] == 1)):
        folded = q.reshape(batch, 1, heads * q_len, q.shape[-1])
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out.view(batch, heads, q_len, v.shape[-1])
    gqa = {}
    if kv_heads != heads:
        if _HAS_ENABLE_GQA:
            gqa = {"enable_gqa": True}
        else:  # pragma: no cover - torch 2.4 only
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, **gqa)
