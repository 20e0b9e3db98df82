"""Tucker Attention whose keys are formed per key head from the cached latent, so that per-head
q/k RMSNorms (Qwen3, Gemma 3) and head RoPE stay exact.

A per-head norm acts on one head's key, which a latent mixing the heads' dimensions no longer
holds; linearizing it (gain x calibration 1/rms) breaks such models below full rank. This layer
keeps the Tucker latent as the cache and forms each key head from it when attending::

    Q_i = RoPE(a_i norm_q((x U2) G[i])) (B, H, T, D)    G = C x1 U1 (H, r2, D), D = head_dim, a: head_scale
    c   = x U3                          (B, 1, S, r3)    cached, as V = x U3~ (B, 1, S, r3~)
    K_g = RoPE(norm_k(c B[g]))          (B, Hkv, S, D)   B (Hkv, r3, D), formed when attending
    O_i = softmax(scale Q_i K_g(i)^T) V                  head i attends with key head i // (H / Hkv)
    y   = sum_i O_i G~[i]^T U2~^T                        (as TuckerAttention)

The KV cache is r3 + r3~ floats per token, as a Tucker layer's; the cost is compute: each step
forms Hkv x D keys for every cached position (B S r3 Hkv D multiply-adds) and attends at width D.
RoPE is the source's head RoPE at width D, applied after the norm, so it stays exact at any rank
(no partial RoPE is needed). :func:`tucker_attention.tensors.to_tucker_heads` builds the exact
form of a q/k-norm GQA layer; :meth:`TuckerHeadsAttention.truncated` lowers its ranks
(:mod:`.tucker_heads_ranks`).
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_int, check_ranks
from . import tucker_heads_ranks
from .base import Attention
from .rope import apply_rope
from .tucker import TuckerAttention


class TuckerHeadsAttention(TuckerAttention):
    """Tucker Attention with per-head q/k RMSNorms kept exactly (module docstring).

    Parameters: query side core (r1, r2, D), U1 (H, r1), U2 (d, r2); key latent U3 (d, r3) and its
    key heads ``key_up`` (Hkv, r3, D); value side as :class:`TuckerAttention` (core~, U1~, U2~, U3~);
    ``q_norm`` / ``k_norm`` gains (D) and ``head_scale`` (H): each head's normed query times it (1 in
    the exact form; a truncation sets it so that the logits keep their scale, as the norms of
    truncated queries and keys would otherwise enlarge them). No biases.

    Args:
        d_model, n_heads: d and H. ranks: (r1, r2, r3), r1 <= H, r2 <= d, r3 <= d (the cached key
            latent). key_heads: Hkv (divides H). head_dim: D. value_ranks: (r1~, r2~, r3~), default
            ``ranks``. rope: None or 'head' (True): RoPE at width D with ``rope_freqs`` (D/2) or the
            default frequencies of ``rope_base``. qk_norm: the per-head RMSNorms (default on; off:
            a linear layer of the same shape). causal, dropout, scale (default 1/sqrt(D)), norm_eps:
            as for :class:`TuckerAttention`.
    """

    method = "tucker_heads"
    rope_modes = (None, "head")
    positional_rope = "head"
    legacy_state_keys = {}

    def __init__(self, d_model: int, n_heads: int, ranks: tuple[int, int, int], *, key_heads: int, head_dim: int,
                 value_ranks: tuple[int, int, int] | None = None, causal: bool = False, rope: str | bool | None = None,
                 dropout: float = 0.0, scale: float | None = None, rope_base: float = 10000.0,
                 rope_freqs: tuple[float, ...] | None = None, qk_norm: bool = True, norm_eps: float = 1e-6):
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        check_int("head_dim", head_dim)
        check_int("key_heads", key_heads, high=n_heads)
        if n_heads % key_heads:
            raise ValueError(f"key_heads must divide n_heads={n_heads}, got {key_heads}")
        if not (isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool) and 0 < norm_eps < 1):
            raise ValueError(f"norm_eps must be a float in (0, 1), got {norm_eps!r}")
        r1, r2, r3 = check_ranks("ranks", ranks, (n_heads, d_model, d_model))
        vr1, vr2, vr3 = check_ranks("value_ranks", value_ranks if value_ranks is not None else ranks,
                                    (n_heads, d_model, d_model))
        Attention.__init__(self, d_model, n_heads, causal=causal, dropout=dropout, scale=scale,
                           default_scale=head_dim ** -0.5, rope=rope, rope_dim=head_dim, rope_base=rope_base,
                           rope_freqs=rope_freqs)
        self.ranks, self.value_ranks, self.shared_kv = (r1, r2, r3), (vr1, vr2, vr3), False
        self.key_heads, self.head_dim = key_heads, head_dim
        empty = torch.empty
        self.core, self.U1 = nn.Parameter(empty(r1, r2, head_dim)), nn.Parameter(empty(n_heads, r1))
        self.U2, self.U3 = nn.Parameter(empty(d_model, r2)), nn.Parameter(empty(d_model, r3))
        self.key_up = nn.Parameter(empty(key_heads, r3, head_dim))
        self.core_tilde, self.U1_tilde = nn.Parameter(empty(vr1, vr2, vr3)), nn.Parameter(empty(n_heads, vr1))
        self.U2_tilde, self.U3_tilde = nn.Parameter(empty(d_model, vr2)), nn.Parameter(empty(d_model, vr3))
        self.q_bias = self.k_bias = self.out_bias = None
        self.norm_eps = float(norm_eps)
        self.q_norm = nn.RMSNorm(head_dim, eps=self.norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=self.norm_eps) if qk_norm else None
        self.head_scale = nn.Parameter(torch.ones(n_heads)) if qk_norm else None
        self.reset_parameters()

    @staticmethod
    def param_count(d_model: int, n_heads: int, ranks, value_ranks, *, key_heads: int, head_dim: int,
                    qk_norm: bool = True) -> int:
        """Parameters of a TuckerHeadsAttention with these shapes (what :meth:`parameters` holds)."""
        (r1, r2, r3), (v1, v2, v3) = ranks, value_ranks
        query = r1 * r2 * head_dim + n_heads * r1 + d_model * r2
        keys = d_model * r3 + key_heads * r3 * head_dim
        values = v1 * v2 * v3 + n_heads * v1 + d_model * (v2 + v3)
        return query + keys + values + (2 * head_dim + n_heads if qk_norm else 0)

    def config(self) -> dict:
        return {**self._common_config(), "ranks": self.ranks, "value_ranks": self.value_ranks,
                "key_heads": self.key_heads, "head_dim": self.head_dim, "qk_norm": self.q_norm is not None,
                "norm_eps": self.norm_eps}

    def nonlinearity(self) -> str | None:
        if self.q_norm is not None:
            return "per-head RMSNorm on queries and on the key heads formed from the latent (qk_norm)"
        return None

    def init_stds(self) -> dict[str, float]:
        return {**super().init_stds(), "key_up": self.ranks[2] ** -0.5}

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.head_scale is not None:
            with torch.no_grad():
                self.head_scale.fill_(1.0)

    def keeps_key_heads(self) -> bool:
        return False                                 # it is the form: truncated() lowers its ranks

    def kernel_layout(self) -> tuple[int, int]:
        return self.key_heads, self.head_dim

    def rotates_keys_on_read(self) -> bool:
        return self.rope is not None

    def native_setting(self, method: str):
        return None

    def tensor_view(self, dtype: torch.dtype = torch.float64):
        raise TypeError(f"{type(self).__name__} forms its keys per head (its q/k norms act there), so it has no "
                        f"tensor view of one shared latent")

    def exact_tucker(self) -> dict:
        raise TypeError(f"{type(self).__name__} is already its own exact form; lower its ranks with truncated()")

    def mode_spectra(self):
        raise TypeError(f"{type(self).__name__} has no mode spectra of W; plan its ranks on the source's "
                        f"linearization (as convert does)")

    def pair_spectrum(self):
        raise TypeError(f"{type(self).__name__} rotates its key heads, not its latent: it has no RoPE pairs")

    @classmethod
    def holding(cls, like: Attention, ranks, value_ranks, values: dict[str, torch.Tensor], *, key_heads: int,
                head_dim: int, norm_eps: float) -> TuckerHeadsAttention:
        """A layer with ``like``'s d_model, heads, RoPE, scale, dropout and causality and these key heads,
        head_dim and norm epsilon, at these ranks, holding ``values`` (float64, q/k norm gains included),
        in ``like``'s dtype, device and mode."""
        with torch.device("meta"):                                   # no init work, no draw from the RNG
            new = cls(like.d_model, like.n_heads, ranks, value_ranks=value_ranks, key_heads=key_heads,
                      head_dim=head_dim, causal=like.causal, rope=like.rope, dropout=like.dropout,
                      scale=like.scale, rope_base=like.rope_base, rope_freqs=like.config().get("rope_freqs"),
                      qk_norm="q_norm.weight" in values, norm_eps=norm_eps)
        return new.to_empty(device="cpu").assign_parameters(values, like=like).train(like.training)

    def truncated(self, ranks: tuple[int, int, int], value_ranks: tuple[int, int, int]) -> TuckerHeadsAttention:
        """A new layer at lower ``ranks`` / ``value_ranks``, each mode truncated where the logits
        (queries) and outputs (values) see the least error (:mod:`.tucker_heads_ranks`)."""
        return tucker_heads_ranks.truncate_heads(self, ranks, value_ranks)

    def _project(self, x, rope):
        q = self._queries(x)                                                        # (B, H, T, D)
        if self.q_norm is not None:
            q = self.q_norm(q) * self.head_scale[:, None, None]
        if rope is not None:
            q = apply_rope(q, *rope)
        return q, {"k": (x @ self.U3).unsqueeze(1), "v": (x @ self.U3_tilde).unsqueeze(1)}

    def _keys_values(self, entries, rope):
        """The key heads K_g = RoPE(norm_k(c B[g])) of every cached latent c; the value latent shared."""
        k = torch.matmul(entries["k"], self.key_up)                                 # (B, Hkv, S, D)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if rope is not None:
            k = apply_rope(k, *rope.key(self.rotary, k.dtype))
        v = entries["v"]
        return k, v.expand(v.shape[0], self.key_heads, *v.shape[2:])

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, ranks={self.ranks}, "
                f"value_ranks={self.value_ranks}, key_heads={self.key_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, rope={self.rope!r}, qk_norm={self.q_norm is not None}")
