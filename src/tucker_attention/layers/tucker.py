"""Tucker Attention (PAPER.md §2-§3, Def. 2.1, Def. 3.1).

Both weight tensors of multi-head attention are Tucker-factorized (Kolda & Bader mode
products)::

    W       = C  x1 U1  x2 U2  x3 U3     C  (r1, r2, r3),    U1 (H, r1),  U2, U3 (d, r2 | r3)
    W_tilde = C~ x1 U1~ x2 U2~ x3 U3~    C~ (r1~, r2~, r3~), U1~ (H, r1~), U2~ (d, r2~), U3~ (d, r3~)

and evaluated without ever forming a d x d matrix, as multi-query attention over shared
latents (G = C x1 U1 (H, r2, r3), G~ = C~ x1 U1~ (H, r2~, r3~))::

    Q_i = (x U2) G[i]    (B, H, T, r3)      K = x U3  (B, 1, S, r3)     V = x U3~  (B, 1, S, r3~)
    O_i = softmax(scale Q_i K^T) V          y = sum_i O_i G~[i]^T U2~^T   (B, T, d)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_even, check_int, check_ranks
from .base import Attention, init_normal_
from .rope import apply_rope


def _head_core(U1: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """core x1 U1: (r1, a, b) with U1 (H, r1) -> (H, a, b)."""
    return torch.einsum("hc,cab->hab", U1, core)


class TuckerAttention(Attention):
    """Tucker Attention with ranks ``(r1, r2, r3)`` (head, query, key modes of W).

    Cache per token: the key latent ``k`` (r3) and value latent ``v`` (r3~), or with
    ``shared_kv`` one latent ``kv`` (r3) serving as both (U3~ = U3, like MLA's shared latent).
    Latent RoPE (``rope=True``, Def. 3.1) rotates Q_i and K in the r3-dim latent, so logits
    depend on positions only through their difference; a shared latent is cached unrotated
    and its key copy rotated on read.

    Parameters per layer: r1 r2 r3 + H r1 + d r2 + d r3 for W, the same with tildes for
    W_tilde (minus d r3~ with ``shared_kv``); plus H r3 + d with ``bias``.

    Initialization (variance-preserving for unit-variance x, independent of the ranks)::

        U2, U3, U3~ ~ N(0, 1/d)    -> x U2, K, V have unit variance
        U1 ~ N(0, 1/r1), C ~ N(0, 1/r2)               -> Var Q_i = r2 * r1 * (1/r1) * (1/r2) = 1
        U1~ ~ N(0, 1/r1~), C~ ~ N(0, 1/(H r3~)), U2~ ~ N(0, 1/r2~)
                         -> Var y = r2~ (1/r2~) * H r1~ (1/r1~) * r3~ / (H r3~) * Var O = Var O,

    the same output variance as MHA with N(0, 1/fan_in) projections. Per-factor "fan-in of
    the first dimension" init would instead grow the query scale with the ranks. The default
    scale 1/sqrt(r3) (the width of Q_i and K) gives unit-variance logits at any r3; it is the
    paper's 1/sqrt(d/H) when r3 = head_dim. With r3 < head_dim, 1/sqrt(d/H) would start
    attention flatter (logit variance r3 / (d/H)) and, measured, trains worse
    (docs/lm-study.md). Conversions (``to_tucker``, ``compress``) keep the source's scale.

    Args:
        d_model: width d. n_heads: query heads H.
        ranks: (r1, r2, r3) with 1 <= r1 <= H, 1 <= r2, r3 <= d.
        value_ranks: (r1~, r2~, r3~) for W_tilde (head, output, value modes); default ``ranks``.
            Equal key and value widths (r3 == r3~) are what reach the flash kernels.
        shared_kv: tie the value latent to the key latent (U3~ = U3); needs r3~ == r3.
        rope: latent RoPE on the r3-dim latent (r3 must be even).
        causal, dropout, rope_base: as on every layer. scale: default 1/sqrt(r3).
        bias: a per-head query bias in the latent (H, r3) and an output bias (d); key and
            value biases are redundant (a key bias cancels in softmax without RoPE, a value
            bias passes through softmax into the output bias).
    """

    def __init__(self, d_model: int, n_heads: int, ranks: tuple[int, int, int], *,
                 value_ranks: tuple[int, int, int] | None = None, shared_kv: bool = False,
                 causal: bool = False, rope: bool = False, dropout: float = 0.0, bias: bool = False,
                 scale: float | None = None, rope_base: float = 10000.0):
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        highs = (n_heads, d_model, d_model)
        r1, r2, r3 = check_ranks("ranks", ranks, highs)
        vr1, vr2, vr3 = check_ranks("value_ranks", value_ranks if value_ranks is not None else ranks, highs)
        if shared_kv and vr3 != r3:
            raise ValueError(f"shared_kv=True ties the value latent to the key latent, so value_ranks[2] "
                             f"must equal ranks[2]={r3}, got {vr3}")
        if rope:
            check_even("ranks[2] (r3, the latent RoPE width)", r3)
        super().__init__(d_model, n_heads, causal=causal, dropout=dropout, scale=scale,
                         default_scale=1.0 / math.sqrt(ranks[2]), rope_dim=r3 if rope else None,
                         rope_base=rope_base)
        self.ranks, self.value_ranks, self.shared_kv = (r1, r2, r3), (vr1, vr2, vr3), bool(shared_kv)
        self.rotate_cached_latent = self.shared_kv and bool(rope)
        empty = torch.empty
        self.core, self.U1 = nn.Parameter(empty(r1, r2, r3)), nn.Parameter(empty(n_heads, r1))
        self.U2, self.U3 = nn.Parameter(empty(d_model, r2)), nn.Parameter(empty(d_model, r3))
        self.core_tilde, self.U1_tilde = nn.Parameter(empty(vr1, vr2, vr3)), nn.Parameter(empty(n_heads, vr1))
        self.U2_tilde = nn.Parameter(empty(d_model, vr2))
        self._U3_tilde = None if shared_kv else nn.Parameter(empty(d_model, vr3))
        self.q_bias = nn.Parameter(empty(n_heads, r3)) if bias else None
        self.out_bias = nn.Parameter(empty(d_model)) if bias else None
        self._memo: list[tuple | None] = [None, None]  # see _forward_core
        self.reset_parameters()

    method = "tucker"

    def config(self) -> dict:
        return {**self._common_config(), "ranks": self.ranks, "value_ranks": self.value_ranks,
                "shared_kv": self.shared_kv, "rope": self.rotary is not None, "bias": self.q_bias is not None}

    @property
    def U3_tilde(self) -> torch.Tensor:
        """Value-side factor U3~ (d, r3~); U3 itself with ``shared_kv``."""
        return self.U3 if self._U3_tilde is None else self._U3_tilde

    def reset_parameters(self) -> None:
        (r1, r2, _), (vr1, vr2, vr3) = self.ranks, self.value_ranks
        for factor in (self.U2, self.U3, self._U3_tilde):
            if factor is not None:
                init_normal_(factor, self.d_model)
        init_normal_(self.U1, r1)
        init_normal_(self.core, r2)
        init_normal_(self.U1_tilde, vr1)
        init_normal_(self.core_tilde, self.n_heads * vr3)
        init_normal_(self.U2_tilde, vr2)
        for b in (self.q_bias, self.out_bias):
            if b is not None:
                nn.init.zeros_(b)

    def head_cores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """G = C x1 U1 (H, r2, r3) and G~ = C~ x1 U1~ (H, r2~, r3~)."""
        return _head_core(self.U1, self.core), _head_core(self.U1_tilde, self.core_tilde)

    def _forward_core(self, side: int) -> torch.Tensor:
        """G as (r2, H*r3) for ``side=0``, G~ as (H*r3~, r2~) for ``side=1``: the layouts the
        forward multiplies by. Without autograd (decoding, evaluation) each is memoized until
        one of its factors changes (storage, dtype, device or version counter)."""
        U1, core = (self.U1, self.core) if side == 0 else (self.U1_tilde, self.core_tilde)
        key = None
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            key = tuple((f.data_ptr(), f._version, f.dtype, f.device) for f in (U1, core))
            if self._memo[side] is not None and self._memo[side][0] == key:
                return self._memo[side][1]
        G = _head_core(U1, core)                                                    # (H, r2, r3)
        if side == 0:
            layout = G.transpose(0, 1).reshape(G.shape[1], -1)                      # column i*r3 + b: G[i, :, b]
        else:
            layout = G.transpose(1, 2).reshape(-1, G.shape[1])                      # row i*r3~ + b: G~[i, :, b]
        self._memo[side] = None if key is None else (key, layout)
        return layout

    def cache_spec(self) -> dict[str, tuple[int, int]]:
        r3, vr3 = self.ranks[2], self.value_ranks[2]
        return {"kv": (1, r3)} if self.shared_kv else {"k": (1, r3), "v": (1, vr3)}

    def _project(self, x, rope):
        batch, steps, _ = x.shape
        r3 = self.ranks[2]
        q = (x @ self.U2) @ self._forward_core(0)                                 # (B, T, H*r3)
        q = q.view(batch, steps, self.n_heads, r3).transpose(1, 2)                # (B, H, T, r3)
        if self.q_bias is not None:
            q = q + self.q_bias[:, None, :]
        k = (x @ self.U3).unsqueeze(1)                                             # (B, 1, T, r3)
        if rope is not None:
            q = apply_rope(q, *rope)
        if self.shared_kv:
            return q, {"kv": k}
        if rope is not None:
            k = apply_rope(k, *rope)
        return q, {"k": k, "v": (x @ self.U3_tilde).unsqueeze(1)}                # v (B, 1, T, r3~)

    def _output(self, o):
        batch, _, steps, vr3 = o.shape
        z = o.transpose(1, 2).reshape(batch, steps, self.n_heads * vr3)           # (B, T, H*r3~)
        z = z @ self._forward_core(1)                                              # (B, T, r2~)
        y = z @ self.U2_tilde.T                                                    # (B, T, d)
        return y if self.out_bias is None else y + self.out_bias

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, ranks={self.ranks}, "
                f"value_ranks={self.value_ranks}, shared_kv={self.shared_kv}, causal={self.causal}, "
                f"rope={self.rotary is not None}")
