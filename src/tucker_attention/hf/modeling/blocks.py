"""The drop-in module that runs one of our layers in place of a transformers attention block.

The layer's own ``forward`` (the one forward of every variant) does the projections, the
cache and the output; the attention itself goes through transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS`` by ``config._attn_implementation``), so ``eager``, ``sdpa``,
``flex_attention``, a kernel a user registers with ``AttentionInterface.register`` and the
paged/flash kernels of serving engines all apply. They see what the layer computes with:
for Tucker, queries (B, H, T, r3) and one key/value head of width r3 (PAPER.md §3).
"""

from __future__ import annotations

import torch
from torch import nn

from ...layers import Attention, RopeTables
from .cache import HFCache, SharedRope


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask, *, scaling: float, dropout: float = 0.0, softcap: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``eager`` kernel of converted blocks: explicit softmax in float32, as transformers' own.

    query (B, H, T, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv), mask additive float or bool
    (True = attend) broadcasting to (B, H, T, S) -> ((B, T, H, Dv), weights (B, H, T, S)).
    Key heads are broadcast over their query groups without copies.
    """
    batch, heads, steps, width = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads * steps, width)
    logits = (q @ key.transpose(-1, -2) * scaling).view(batch, heads, steps, key.shape[2])
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[2]]
        if mask.dtype == torch.bool:                  # the dtype's minimum, as transformers: a fully
            mask = torch.zeros((), dtype=logits.dtype, device=logits.device).masked_fill(   # masked (padding)
                ~mask, torch.finfo(logits.dtype).min)                                     # row stays finite
        logits = logits + mask
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = (weights.view(batch, kv_heads, heads // kv_heads * steps, -1) @ value).view(batch, heads, steps, -1)
    return out.transpose(1, 2), weights


class HFAttention(nn.Module):
    """Drop-in for a transformers attention block: one of our layers behind the block's call.

    ``forward(hidden_states, attention_mask=None, **kwargs) -> (output (B, T, d), None)`` runs
    ``layer.forward`` with

    - the model's ``Cache`` behind :class:`~.cache.HFCache`, which stores exactly the layer's
      ``cache_spec()`` (e.g. one r3-wide latent for a shared Tucker layer);
    - the model's RoPE tables (``position_embeddings``) when the layer keeps head-dimension
      RoPE; latent RoPE at the model's ``position_ids`` (keys are rotated when cached), or, for
      a shared latent whose key copy is rotated on read, at cache-slot positions shared by all
      blocks (``rope_source``): RoPE logits depend only on position differences, and within a
      sequence a slot differs from the model's position by a per-row constant;
    - a kernel that calls the model's attention interface with the model's own mask (bool,
      additive or a flex ``BlockMask``), ``sliding_window`` / ``softcap`` of the original
      block and every other keyword the model passes (serving engines' paged-attention
      arguments included).

    The attributes the interface reads are those of transformers' attention modules:
    ``config`` (the model's, so ``model.set_attn_implementation`` applies), ``layer_idx``,
    ``is_causal``, ``scaling``, ``num_key_value_groups``, ``head_dim``.
    """

    def __init__(self, layer: Attention, *, kind: str, layer_idx: int | None = None, model_rope: bool = False,
                 resid_dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                 config=None, rope_source: SharedRope | None = None):
        super().__init__()
        self.layer, self.kind, self.layer_idx = layer, kind, layer_idx
        self.model_rope = bool(model_rope) and layer.rope == "head"
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.config = config
        self.rope_source = rope_source if rope_source is not None else SharedRope()

    # -- what transformers' attention functions read from the module ---------------------------
    @property
    def is_causal(self) -> bool:
        return self.layer.causal

    @property
    def scaling(self) -> float:
        return self.layer.scale

    @property
    def num_key_value_groups(self) -> int:
        return self.layer.n_heads // self.layer.kernel_layout()[0]

    @property
    def head_dim(self) -> int:
        return self.layer.kernel_layout()[1]

    def spec(self) -> dict:
        """What rebuilds this block: the layer's config and the block facts."""
        return {"layer": self.layer.config(), "kind": self.kind, "layer_idx": self.layer_idx,
                "model_rope": self.model_rope, "resid_dropout": self.resid_dropout.p,
                "sliding_window": self.sliding_window, "softcap": self.softcap}

    def _kernel(self, attention_mask, kwargs: dict):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        implementation = getattr(self.config, "_attn_implementation", None) or "eager"
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            function = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        else:                                                            # transformers < 5.3 or so
            function = eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        options = dict(kwargs)
        for name in ("sliding_window", "softcap"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)

        def kernel(q, k, v, *, scale, causal, attn_mask, dropout_p):
            out, _ = function(self, q, k, v, attention_mask, dropout=dropout_p, scaling=scale, **options)
            return out.transpose(1, 2)                                   # (B, T, H, Dv) -> (B, H, T, Dv)
        return kernel

    def _rope(self, cache: HFCache | None, steps: int, device, kwargs: dict) -> RopeTables | None:
        layer = self.layer
        if self.model_rope:
            if kwargs.get("position_embeddings") is None:
                raise ValueError("this block needs the model's RoPE tables (position_embeddings)")
            return RopeTables(None, given=tuple(t.unsqueeze(1) for t in kwargs["position_embeddings"]))  # (B,1,T,D)
        if layer.rope is None:
            return None
        past, first_key = (cache.length, cache.first_key(steps)) if cache is not None else (0, 0)
        position_ids = None if layer.rotates_keys_on_read() else kwargs.get("position_ids")
        return self.rope_source.tables(past, steps, first_key, device, position_ids)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("cross-attention is not converted; this block is self-attention only")
        cache = None
        for name in ("cache", "past_key_values", "past_key_value", "layer_past"):   # layer_past: GPT-NeoX
            cache = cache if cache is not None else kwargs.pop(name, None)
        cache = getattr(cache, "self_attention_cache", cache)              # EncoderDecoderCache
        x = hidden_states
        ours = HFCache(cache, self.layer_idx, self.layer.cache_spec(), kwargs) if cache is not None else None
        rope = self._rope(ours, x.shape[1], x.device, kwargs)
        kwargs.pop("position_embeddings", None)
        y = self.layer(x, cache=ours, rope=rope, kernel=self._kernel(attention_mask, kwargs))
        return self.resid_dropout(y), None


def layout_of(layers: list[Attention]) -> dict | None:
    """The serving layout ``layers`` cache, {'num_key_value_heads': 1, 'head_dim': width}, when every
    layer caches one key head and one value head of one common width (Tucker with r3~ = r3, not
    shared: keys rotated as they are cached); None for encoders and other layouts (per-layer widths,
    a shared latent stored once, keys formed when read)."""
    specs = [layer.cache_spec() for layer in layers]
    widths = {w for spec in specs for _, w in spec.values()}
    if (not all(layer.causal for layer in layers) or len(widths) != 1
            or not all(list(spec) == ["k", "v"] and {h for h, _ in spec.values()} == {1} for spec in specs)
            or any(layer.kernel_layout() != spec["k"] for layer, spec in zip(layers, specs))):   # keys formed on read
        return None
    return {"num_key_value_heads": 1, "head_dim": widths.pop()}


def window_mask(steps: int, window: int | None) -> torch.Tensor | None:
    """The bool (1, 1, T, T) band of a sliding window (None: none; a causal layer adds causality)."""
    if window is None:
        return None
    rows, cols = torch.arange(steps)[:, None], torch.arange(steps)[None, :]
    return ((rows - cols) < window)[None, None]
