"""The projection-free base of every attention layer and the single SDPA call.

Shape legend used in all layer docstrings:
B batch, T query length, S key length (cached + new), H query heads, Hkv key/value heads,
D query/key width, Dv value width, d d_model, r1 r2 r3 Tucker ranks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .._checks import check_input, check_int, check_probability
from .cache import KVCache
from .rope import RotaryEmbedding, apply_rope

_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def _check_mask(attn_mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int) -> None:
    allowed = f"(1 or {batch}, 1 or {heads}, 1 or {q_len}, {k_len})"
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
        _check_mask(attn_mask, batch, heads, q_len, k_len)
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


def init_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """N(0, 1/fan_in): a unit-variance input gives unit-variance outputs. The std is kept as
    ``weight.init_std`` for :meth:`Attention.lr_scales`."""
    weight.init_std = fan_in ** -0.5
    return nn.init.normal_(weight, std=weight.init_std)


class Attention(nn.Module, ABC):
    """Base of MHA/GQA, MLA and Tucker: input checks, RoPE tables, the cache, the SDPA call.

    Input and output are (B, T, d_model). A subclass defines

    - ``cache_spec() -> {name: (heads, width)}``: what one token leaves in the cache;
    - ``_project(x, rope) -> (q, entries)``: queries (B, H, T, D) and the new cache entries
      {name: (B, heads, T, width)}; ``rope`` is ``(cos, sin)`` for the T positions or None;
    - ``_keys_values(entries, key_positions) -> (k, v)`` from all S cached entries (a
      default covers ``k``/``v`` entries and one shared latent ``kv``);
    - ``_output(o) -> y``: (B, H, T, Dv) -> (B, T, d_model).
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, dropout: float, scale: float | None,
                 default_scale: float, rope_dim: int | None, rope_base: float):
        super().__init__()
        self.d_model = check_int("d_model", d_model)
        self.n_heads = check_int("n_heads", n_heads)
        self.causal = bool(causal)
        self.dropout = check_probability("dropout", dropout)
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
        self.scale = float(scale) if scale is not None else default_scale
        self.rotary = RotaryEmbedding(rope_dim, rope_base) if rope_dim else None
        self.rope_base = float(rope_base)
        self.rotate_cached_latent = False  # set by layers whose shared latent ``kv`` needs RoPE on read

    method: str = ""  # the name make_attention builds this class by

    # -- what subclasses define -------------------------------------------------------------
    @abstractmethod
    def config(self) -> dict:
        """Constructor arguments, with ``method``: ``make_attention(**layer.config())`` rebuilds it."""

    @abstractmethod
    def cache_spec(self) -> dict[str, tuple[int, int]]:
        """{name: (heads, width)} of what one token leaves in the cache."""

    @abstractmethod
    def _project(self, x, rope):
        """x (B, T, d) -> queries (B, H, T, D), new cache entries {name: (B, heads, T, width)}."""

    def _keys_values(self, entries, key_positions):
        """Cached entries over S positions -> k (B, Hkv, S, D), v (B, Hkv, S, Dv).

        Default: the cached ``k`` and ``v``; or one shared latent ``kv`` that serves as both,
        its key copy rotated on read when ``rotate_cached_latent`` (latent RoPE on a latent
        cached unrotated, since the values need it unrotated).
        """
        if "kv" not in entries:
            return entries["k"], entries["v"]
        latent = entries["kv"]
        if not self.rotate_cached_latent:
            return latent, latent
        return apply_rope(latent, *self._rope_tables(key_positions, latent.dtype)), latent

    @abstractmethod
    def _output(self, o):
        """o (B, H, T, Dv) -> y (B, T, d_model)."""

    # -- shared machinery -------------------------------------------------------------------
    def _common_config(self) -> dict:
        return {"method": self.method, "d_model": self.d_model, "n_heads": self.n_heads, "causal": self.causal,
                "dropout": self.dropout, "scale": self.scale, "rope_base": self.rope_base}

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        return self.rotary(positions, dtype) if self.rotary is not None else None

    def lr_scales(self) -> dict[str, float]:
        """{parameter name: learning-rate multiplier} of the *relative* rule: init std × sqrt(d_model).

        Under Adam every weight then moves by the same fraction of its initial scale per step
        as an MHA projection (std 1/sqrt(d_model), multiplier 1). For MHA/GQA/MQA all
        multipliers are 1; the small cores and head factors of Tucker (and MLA's up-projections)
        get larger ones. Biases and norm gains: 1.
        """
        unit = self.d_model ** 0.5
        return {name: round(getattr(p, "init_std", 1 / unit) * unit, 12) for name, p in self.named_parameters()}

    def make_cache(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        """A preallocated cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens."""
        ref = next(self.parameters())
        return KVCache(self.cache_spec(), batch_size, max_seq_len, dtype=dtype or ref.dtype,
                       device=device if device is not None else ref.device)

    def forward(self, x: torch.Tensor, *, cache: KVCache | None = None, attn_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model).

        cache: a :class:`KVCache` from :meth:`make_cache`; the chunk is appended and attends
            causally to every cached token. Requires ``causal=True``.
        attn_mask: bool (1|B, 1|H, 1|T, S), True = may attend; combined with causality.
        positions: (T,) RoPE positions; default ``cache.length + arange(T)`` (or ``arange(T)``).
        """
        check_input(x, self.d_model)
        steps = x.shape[1]
        if cache is not None:
            if not self.causal:
                raise ValueError("cache decoding needs a causal layer (construct it with causal=True)")
            if not isinstance(cache, KVCache) or cache.spec != self.cache_spec():
                raise ValueError(f"cache does not fit this layer: it needs {self.cache_spec()}, "
                                 f"got {getattr(cache, 'spec', type(cache).__name__)}; use layer.make_cache()")
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + steps, device=x.device)
        elif positions.shape != (steps,):
            raise ValueError(f"positions must have shape (seq,) = ({steps},), got {tuple(positions.shape)}")
        q, entries = self._project(x, self._rope_tables(positions, x.dtype))
        key_positions = positions
        if cache is not None:
            entries, key_positions = cache.append(entries, positions)
        k, v = self._keys_values(entries, key_positions)
        o = attend(q, k, v, scale=self.scale, causal=self.causal, attn_mask=attn_mask,
                   dropout_p=self.dropout if self.training else 0.0)
        return self._output(o)
