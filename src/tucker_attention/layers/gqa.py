"""Multi-head, grouped-query and multi-query attention: one implementation.

MHA is GQA with ``n_kv_heads == n_heads``; MQA is GQA with ``n_kv_heads == 1``
(PAPER.md §4: Tucker ranks (h, d, n_kv * head_dim) for both tensors).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_even, check_int, resolve_head_dim
from .base import Attention, init_normal_
from .rope import apply_rope


class GroupedQueryAttention(Attention):
    """Grouped-query attention (Ainslie et al. 2023); ``n_kv_heads=1`` is MQA, ``= n_heads`` MHA.

    Each group of ``n_heads // n_kv_heads`` query heads shares one key/value head::

        q_i = x W^Q_i   (B, H, T, head_dim)      k_g = x W^K_g, v_g = x W^V_g   (B, Hkv, S, head_dim)
        y   = concat_i softmax(scale q_i k_g(i)^T) v_g(i)  W^O

    Cache per token: ``k`` and ``v``, each (n_kv_heads, head_dim). Init: every projection
    N(0, 1/fan_in), so unit-variance x gives unit-variance q, k, v and an output whose
    variance equals that of the attention-weighted values.

    Args:
        d_model: width d of input and output.
        n_heads: query heads H.
        n_kv_heads: key/value heads; must divide ``n_heads``.
        head_dim: per-head width; default ``d_model // n_heads`` (then ``d_model % n_heads == 0``).
        causal: mask future tokens. rope: head-dimension RoPE on q and k.
        dropout: attention-probability dropout in training. bias: biases on q, k, v, o.
        scale: logit scale; default ``1/sqrt(head_dim)``. rope_base: RoPE frequency base.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, head_dim: int | None = None,
                 causal: bool = False, rope: bool = False, dropout: float = 0.0, bias: bool = False,
                 scale: float | None = None, rope_base: float = 10000.0):
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        check_int("n_kv_heads", n_kv_heads, high=n_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be divisible by n_kv_heads={n_kv_heads}; "
                             f"allowed n_kv_heads: {[g for g in range(1, n_heads + 1) if n_heads % g == 0]}")
        head_dim = resolve_head_dim(d_model, n_heads, head_dim)
        if rope:
            check_even("head_dim (the RoPE width)", head_dim)
        super().__init__(d_model, n_heads, causal=causal, dropout=dropout, scale=scale,
                         default_scale=1.0 / math.sqrt(head_dim), rope_dim=head_dim if rope else None,
                         rope_base=rope_base)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.reset_parameters()

    method = "gqa"

    def config(self) -> dict:
        extra = {"n_kv_heads": self.n_kv_heads} if self.method == "gqa" else {}
        return {**self._common_config(), **extra, "head_dim": self.head_dim, "rope": self.rotary is not None,
                "bias": self.q_proj.bias is not None}

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            init_normal_(proj.weight, proj.in_features)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def cache_spec(self) -> dict[str, tuple[int, int]]:
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        batch, steps, _ = t.shape
        return t.view(batch, steps, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def _project(self, x, rope):
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, {"k": k, "v": self._heads(self.v_proj(x), self.n_kv_heads)}

    def _output(self, o):
        batch, _, steps, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(batch, steps, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, rope={self.rotary is not None}")


class MultiHeadAttention(GroupedQueryAttention):
    """Standard multi-head attention (Vaswani et al. 2017): GQA with ``n_kv_heads == n_heads``.

    Cache per token: ``k``, ``v`` each (n_heads, head_dim), i.e. 2 d_model floats.
    """

    method = "mha"

    def __init__(self, d_model: int, n_heads: int, *, head_dim: int | None = None, causal: bool = False,
                 rope: bool = False, dropout: float = 0.0, bias: bool = False, scale: float | None = None,
                 rope_base: float = 10000.0):
        check_int("n_heads", n_heads)
        super().__init__(d_model, n_heads, n_heads, head_dim=head_dim, causal=causal, rope=rope,
                         dropout=dropout, bias=bias, scale=scale, rope_base=rope_base)


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention (Shazeer 2019): GQA with one key/value head."""

    method = "mqa"

    def __init__(self, d_model: int, n_heads: int, *, head_dim: int | None = None, causal: bool = False,
                 rope: bool = False, dropout: float = 0.0, bias: bool = False, scale: float | None = None,
                 rope_base: float = 10000.0):
        super().__init__(d_model, n_heads, 1, head_dim=head_dim, causal=causal, rope=rope,
                         dropout=dropout, bias=bias, scale=scale, rope_base=rope_base)
