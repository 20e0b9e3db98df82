"""The drop-in module that runs one of our layers in place of a transformers attention block."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import Attention, RopeTables
from .cache import HFCache, SharedRope


def _bool_mask(mask) -> torch.Tensor | None:
    """The model's attention mask as bool (True = attend): HF passes bool (sdpa) or additive float (eager)."""
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
        return mask
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        raise ValueError(f"unsupported attention mask {type(mask).__name__}; load the model with "
                         f"attn_implementation='sdpa' or 'eager'")
    keep = mask == 0
    if not bool((keep | (mask <= -1e4)).all()):
        raise ValueError("additive attention masks other than 0 / -inf (e.g. ALiBi biases) are not supported")
    return keep


class HFAttention(nn.Module):
    """Drop-in for a transformers attention block: one of our layers behind the block's call.

    ``forward(hidden_states, attention_mask=None, **kwargs) -> (output (B, T, d), None)`` runs
    ``layer.forward`` (the one forward of every variant) with the model's mask (bool or
    additive, (B, 1, T, S)), its RoPE tables (``position_embeddings``) when the layer keeps
    head-dimension RoPE, and the model's ``Cache`` behind :class:`~.cache.HFCache`, which
    stores exactly the layer's ``cache_spec()`` (e.g. one r3-wide latent for a shared Tucker).

    Latent RoPE uses cache-slot positions (``past + arange(T)`` for queries, ``arange(S)`` for
    keys) from a table source shared by all blocks of the model (``rope_source``), so each
    forward computes each table once. RoPE logits depend only on position differences, and
    within a sequence a slot index differs from the model's ``position_ids`` by a per-row
    constant (left padding included), so the logits are the same.
    """

    def __init__(self, layer: Attention, *, kind: str, layer_idx: int | None = None, model_rope: bool = False,
                 resid_dropout: float = 0.0, rope_source: SharedRope | None = None):
        super().__init__()
        self.layer, self.kind, self.layer_idx = layer, kind, layer_idx
        self.model_rope = bool(model_rope) and layer.rope == "head"
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.rope_source = rope_source if rope_source is not None else SharedRope()

    def spec(self) -> dict:
        """What rebuilds this block: the layer's config and the block facts."""
        return {"layer": self.layer.config(), "kind": self.kind, "layer_idx": self.layer_idx,
                "model_rope": self.model_rope, "resid_dropout": self.resid_dropout.p}

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("cross-attention is not converted; this block is self-attention only")
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None),
                     None)
        cache = getattr(cache, "self_attention_cache", cache)              # EncoderDecoderCache
        layer, x = self.layer, hidden_states
        ours = HFCache(cache, self.layer_idx, layer.cache_spec()) if cache is not None else None
        past = ours.length if ours is not None else 0
        rope = None
        if self.model_rope:
            if kwargs.get("position_embeddings") is None:
                raise ValueError("this block needs the model's RoPE tables (position_embeddings)")
            rope = RopeTables(None, given=tuple(t.unsqueeze(1) for t in kwargs["position_embeddings"]))  # (B,1,T,D)
        elif layer.rope is not None:
            rope = self.rope_source.tables(past, x.shape[1], x.device)
        y = layer(x, cache=ours, attn_mask=_bool_mask(attention_mask), rope=rope)
        return self.resid_dropout(y), None
