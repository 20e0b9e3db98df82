"""Multi-head, grouped-query and multi-query attention: one implementation.

MHA is GQA with ``n_kv_heads == n_heads``; MQA is GQA with ``n_kv_heads == 1``
(PAPER.md §4: Tucker ranks (h, d, n_kv * head_dim) for both tensors).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_even, check_int, resolve_head_dim
from .base import Attention
from .factors import AttentionFactors, HeadFactors, head_blocks
from .rope import apply_rope


def routing_core(h: int, width: int, per_group: int) -> torch.Tensor:
    """(h, h*width, (h/per_group)*width) float64: core[i] is the identity from head i's block to its group's block."""
    core = torch.zeros(h, h * width, h // per_group * width, dtype=torch.float64)
    for i in range(h):
        g = i // per_group
        core[i, i * width:(i + 1) * width, g * width:(g + 1) * width] = torch.eye(width, dtype=torch.float64)
    return core


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
        causal: mask future tokens. rope: ``'head'`` (or True): head-dimension RoPE on q and k; None/False: none.
        dropout: attention-probability dropout in training. bias: biases on q, k, v, o.
        scale: logit scale; default ``1/sqrt(head_dim)``. rope_base: RoPE frequency base.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, head_dim: int | None = None,
                 causal: bool = False, rope: str | bool | None = None, dropout: float = 0.0, bias: bool = False,
                 scale: float | None = None, rope_base: float = 10000.0):
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        check_int("n_kv_heads", n_kv_heads, high=n_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be divisible by n_kv_heads={n_kv_heads}; "
                             f"allowed n_kv_heads: {[g for g in range(1, n_heads + 1) if n_heads % g == 0]}")
        head_dim = resolve_head_dim(d_model, n_heads, head_dim)
        rope = self.rope_mode(rope)
        if rope:
            check_even("head_dim (the RoPE width)", head_dim)
        super().__init__(d_model, n_heads, causal=causal, dropout=dropout, scale=scale,
                         default_scale=1.0 / math.sqrt(head_dim), rope=rope, rope_dim=head_dim, rope_base=rope_base)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.reset_parameters()

    method = "gqa"
    rope_modes = (None, "head")
    positional_rope = "head"

    def config(self) -> dict:
        return {**self._common_config(), **self._group_config(), "head_dim": self.head_dim,
                "bias": self.q_proj.bias is not None}

    def _group_config(self) -> dict:
        """The key-head setting among the constructor arguments (MHA and MQA fix it)."""
        return {"n_kv_heads": self.n_kv_heads}

    def _reference_weight(self) -> torch.Tensor:
        return self.q_proj.weight

    def init_stds(self) -> dict[str, float]:
        return {f"{name}.weight": getattr(self, name).in_features ** -0.5
                for name in ("q_proj", "k_proj", "v_proj", "o_proj")}

    def input_weights(self) -> dict[str, str]:
        return dict.fromkeys(("q_proj.weight", "k_proj.weight", "v_proj.weight"), "linear")

    def tensor_view(self, dtype: torch.dtype = torch.float64) -> AttentionFactors:
        """W[i] = W^Q_i W^K_g(i)^T, W_tilde[i] = (W^V_g(i) W^O_i)^T; the query bias seen from the
        key side, value biases passed into the output bias."""
        p = {name: t.detach().to(dtype) for name, t in self.named_parameters()}
        h = self.n_heads
        group = torch.arange(h, device=p["q_proj.weight"].device) // (h // self.n_kv_heads)
        per_head = (lambda t: t) if self.n_kv_heads == h else (lambda t: t[group])     # no copy for MHA
        A, B = head_blocks(p["q_proj.weight"], h), per_head(head_blocks(p["k_proj.weight"], self.n_kv_heads))
        C, D = head_blocks(p["o_proj.weight"].T, h), per_head(head_blocks(p["v_proj.weight"], self.n_kv_heads))
        key_bias = out_bias = None
        if "q_proj.bias" in p:
            key_bias = torch.einsum("idk,ik->id", B, p["q_proj.bias"].view(h, -1))
            v_bias = p["v_proj.bias"].view(self.n_kv_heads, -1)[group]
            out_bias = p["o_proj.bias"] + torch.einsum("idk,ik->d", C, v_bias)
        return AttentionFactors(HeadFactors(A, B), HeadFactors(C, D), key_bias, out_bias)

    def exact_tucker(self) -> dict:
        """Thms. B.2-B.3: U1 = I, U2 = W^Q, U3 = the n_kv key heads stacked, a core routing head i
        to its key group; the same for W_tilde with W^O and W^V."""
        if self.rope is not None:
            raise ValueError(f"{type(self).__name__} uses RoPE on each head (rope='head'), which has no Tucker "
                             f"form (it rotates each head, not a shared latent); convert a layer built with rope=None")
        p = {name: t.detach().to(torch.float64) for name, t in self.named_parameters()}
        h = self.n_heads
        eye = torch.eye(h, dtype=torch.float64)
        route = routing_core(h, self.head_dim, h // self.n_kv_heads)
        return {"pre": (route, (eye, p["q_proj.weight"].T, p["k_proj.weight"].T)),
                "post": (route.clone(), (eye, p["o_proj.weight"], p["v_proj.weight"].T)),
                "shared_kv": False, "rope": None}

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
                f"head_dim={self.head_dim}, causal={self.causal}, rope={self.rope!r}")


class MultiHeadAttention(GroupedQueryAttention):
    """Standard multi-head attention (Vaswani et al. 2017): GQA with ``n_kv_heads == n_heads``.

    Cache per token: ``k``, ``v`` each (n_heads, head_dim), i.e. 2 d_model floats.
    """

    method = "mha"

    def _group_config(self) -> dict:
        return {}

    def __init__(self, d_model: int, n_heads: int, *, head_dim: int | None = None, causal: bool = False,
                 rope: str | bool | None = None, dropout: float = 0.0, bias: bool = False, scale: float | None = None,
                 rope_base: float = 10000.0):
        check_int("n_heads", n_heads)
        super().__init__(d_model, n_heads, n_heads, head_dim=head_dim, causal=causal, rope=rope,
                         dropout=dropout, bias=bias, scale=scale, rope_base=rope_base)


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention (Shazeer 2019): GQA with one key/value head."""

    method = "mqa"

    def _group_config(self) -> dict:
        return {}

    def __init__(self, d_model: int, n_heads: int, *, head_dim: int | None = None, causal: bool = False,
                 rope: str | bool | None = None, dropout: float = 0.0, bias: bool = False, scale: float | None = None,
                 rope_base: float = 10000.0):
        super().__init__(d_model, n_heads, 1, head_dim=head_dim, causal=causal, rope=rope,
                         dropout=dropout, bias=bias, scale=scale, rope_base=rope_base)
