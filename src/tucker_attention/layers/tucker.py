"""Tucker Attention (PAPER.md §2-§3, Def. 2.1, Def. 3.1).

Both weight tensors of multi-head attention are Tucker-factorized (Kolda & Bader mode
products)::

    W       = C  x1 U1  x2 U2  x3 U3     C  (r1, r2, r3),    U1 (H, r1),  U2, U3 (d, r2 | r3)
    W_tilde = C~ x1 U1~ x2 U2~ x3 U3~    C~ (r1~, r2~, r3~), U1~ (H, r1~), U2~ (d, r2~), U3~ (d, r3~)

and evaluated without ever forming a d x d matrix, as multi-query attention over shared
latents (G = C x1 U1 (H, r2, r3), G~ = C~ x1 U1~ (H, r2~, r3~))::

    Q_i = (x U2) G[i]    (B, H, T, r3)      K = x U3  (B, 1, S, r3)     V = x U3~  (B, 1, S, r3~)
    O_i = softmax(scale Q_i K^T) V          y = sum_i O_i G~[i]^T U2~^T   (B, T, d)

Nothing derived is stored: each forward contracts the core and U1 in the cheaper order for
its number of tokens N, ``(x U2) C`` then U1 (N r1 r2 r3 + N H r1 r3 multiply-adds, best for
decoding and r1 < H) or G = C x1 U1 first (H r1 r2 r3 + N H r2 r3), so every parameter change
(optimizer steps, ``.data`` writes, EMA, ``load_state_dict``, ``.to()``) shows at once. Inside
the explicit ``frozen_weights()`` switch (decoding) G and G~ are formed once on entry.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_even, check_int, check_ranks
from . import tucker_ranks
from .base import Attention
from .factors import AttentionFactors, HeadFactors
from .rope import apply_rope


def _head_core(U1: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """core x1 U1: (r1, a, b) with U1 (H, r1) -> (H, a, b)."""
    return torch.einsum("hc,cab->hab", U1, core)


def _factored_first(tokens: int, heads: int, r1: int, r2: int, r3: int) -> bool:
    """Whether contracting the core with the tokens before U1 costs fewer multiply-adds than forming G."""
    return tokens * (r1 * r2 * r3 + heads * r1 * r3) <= heads * r1 * r2 * r3 + tokens * heads * r2 * r3


class TuckerAttention(Attention):
    """Tucker Attention with ranks ``(r1, r2, r3)`` (head, query, key modes of W).

    Cache per token: the key latent ``k`` (r3) and value latent ``v`` (r3~), or with
    ``shared_kv`` one latent ``kv`` (r3) serving as both (U3~ = U3, like MLA's shared latent).
    Latent RoPE (``rope='latent'`` or True, Def. 3.1) rotates Q_i and K in the r3-dim latent, so
    logits depend on positions only through their difference; a shared latent is cached
    unrotated and its key copy rotated on read.

    Parameters per layer: r1 r2 r3 + H r1 + d r2 + d r3 for W, the same with tildes for
    W_tilde (minus d r3~ with ``shared_kv``); plus H r3 + d with ``bias`` (and r3 more under RoPE:
    the key bias).

    Each latent RoPE pair may carry its own frequency (``rope_freqs``): a latent that holds the
    keys of a head-RoPE model's heads, pair by pair with their frequencies, reproduces its logits
    exactly (:func:`tucker_attention.tensors.to_tucker`), and :meth:`truncated` shortens it by
    mixing only pairs of one frequency (:mod:`.rope_pairs`). A frequency of 0 is a pair that is
    not rotated (a partial-RoPE head's other dimensions).

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
        ranks: (r1, r2, r3) with 1 <= r1 <= H, 1 <= r2, r3 <= d (r3 may exceed d under latent RoPE:
            pairs of different frequencies are independent).
        value_ranks: (r1~, r2~, r3~) for W_tilde (head, output, value modes); default ``ranks``.
            Equal key and value widths (r3 == r3~) are what reach the flash kernels.
        shared_kv: tie the value latent to the key latent (U3~ = U3); needs r3~ == r3.
        rope: ``'latent'`` (or True): latent RoPE on the r3-dim latent (r3 must be even); None/False: none.
        rope_freqs: the inverse frequency of each latent pair (r3/2 floats; 0: not rotated); default
            ``rope_base ** (-2j / r3)``.
        causal, dropout, rope_base: as on every layer. scale: default 1/sqrt(r3).
        bias: a per-head query bias in the latent (H, r3) and an output bias (d); under RoPE also a
            key bias in the latent (r3), rotated with the keys (also with ``qk_norm``, normed with them).
            Otherwise a key bias cancels in softmax; a value bias always passes through softmax into
            the output bias.
        qk_norm: RMSNorm over r3 on each head's latent query and on the key latent, before RoPE
            (a one-key-head Qwen3 / Gemma 3 layer in its exact latent form: the latent is that
            head); not with ``shared_kv``. It keeps r3 at its rank in :meth:`truncated`. norm_eps:
            its epsilon.
    """

    method = "tucker"
    legacy_state_keys = {"_U3_tilde": "U3_tilde"}  # written by tucker-attention 0.1
    rope_modes = (None, "latent")
    positional_rope = "latent"

    def __init__(self, d_model: int, n_heads: int, ranks: tuple[int, int, int], *,
                 value_ranks: tuple[int, int, int] | None = None, shared_kv: bool = False,
                 causal: bool = False, rope: str | bool | None = None, dropout: float = 0.0, bias: bool = False,
                 scale: float | None = None, rope_base: float = 10000.0, rope_freqs: tuple[float, ...] | None = None,
                 qk_norm: bool = False, norm_eps: float = 1e-6):
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        rope = self.rope_mode(rope)
        if qk_norm and shared_kv:
            raise ValueError("qk_norm normalizes the key latent, which a shared latent also serves as values; "
                             "use shared_kv=False with qk_norm=True")
        if not (isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool) and 0 < norm_eps < 1):
            raise ValueError(f"norm_eps must be a float in (0, 1), got {norm_eps!r}")
        highs = (n_heads, d_model, d_model)
        r1, r2, r3 = check_ranks("ranks", ranks, highs[:2] + (None if rope else d_model,))
        vr1, vr2, vr3 = check_ranks("value_ranks", value_ranks if value_ranks is not None else ranks,
                                    highs[:2] + (None if rope and shared_kv else d_model,))
        if shared_kv and vr3 != r3:
            raise ValueError(f"shared_kv=True ties the value latent to the key latent, so value_ranks[2] "
                             f"must equal ranks[2]={r3}, got {vr3}")
        if rope:
            check_even("ranks[2] (r3, the latent RoPE width)", r3)
        super().__init__(d_model, n_heads, causal=causal, dropout=dropout, scale=scale,
                         default_scale=1.0 / math.sqrt(r3), rope=rope, rope_dim=r3, rope_base=rope_base,
                         rope_freqs=rope_freqs)
        self.ranks, self.value_ranks, self.shared_kv = (r1, r2, r3), (vr1, vr2, vr3), bool(shared_kv)
        empty = torch.empty
        self.core, self.U1 = nn.Parameter(empty(r1, r2, r3)), nn.Parameter(empty(n_heads, r1))
        self.U2, self.U3 = nn.Parameter(empty(d_model, r2)), nn.Parameter(empty(d_model, r3))
        self.core_tilde, self.U1_tilde = nn.Parameter(empty(vr1, vr2, vr3)), nn.Parameter(empty(n_heads, vr1))
        self.U2_tilde = nn.Parameter(empty(d_model, vr2))
        self.U3_tilde = None if shared_kv else nn.Parameter(empty(d_model, vr3))
        self.q_bias = nn.Parameter(empty(n_heads, r3)) if bias else None
        self.k_bias = nn.Parameter(empty(r3)) if bias and (rope or qk_norm) else None
        self.out_bias = nn.Parameter(empty(d_model)) if bias else None
        self.norm_eps = float(norm_eps)
        self.q_norm = nn.RMSNorm(r3, eps=self.norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(r3, eps=self.norm_eps) if qk_norm else None
        self.reset_parameters()

    def config(self) -> dict:
        norms = {"qk_norm": True, "norm_eps": self.norm_eps} if self.q_norm is not None else {}
        return {**self._common_config(), "ranks": self.ranks, "value_ranks": self.value_ranks,
                "shared_kv": self.shared_kv, "bias": self.q_bias is not None, **norms}

    def nonlinearity(self) -> str | None:
        if self.q_norm is not None:
            return "RMSNorm on each head's latent query and on the key latent (qk_norm)"
        return None

    @property
    def value_factor(self) -> torch.Tensor:
        """Value-side factor U3~ (d, r3~); U3 itself with ``shared_kv``."""
        return self.U3 if self.U3_tilde is None else self.U3_tilde

    def _reference_weight(self) -> torch.Tensor:
        return self.U2

    def init_stds(self) -> dict[str, float]:
        (r1, r2, _), (vr1, vr2, vr3) = self.ranks, self.value_ranks
        stds = {"U2": self.d_model ** -0.5, "U3": self.d_model ** -0.5}
        if self.U3_tilde is not None:
            stds["U3_tilde"] = self.d_model ** -0.5
        return {**stds, "U1": r1 ** -0.5, "core": r2 ** -0.5, "U1_tilde": vr1 ** -0.5,
                "core_tilde": (self.n_heads * vr3) ** -0.5, "U2_tilde": vr2 ** -0.5}

    def input_weights(self) -> dict[str, str]:
        return dict.fromkeys(["U2", "U3"] + ([] if self.U3_tilde is None else ["U3_tilde"]), "factor")

    def value_inputs(self) -> tuple[str, ...]:
        return () if self.U3_tilde is None else ("U3_tilde",)

    def head_cores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """G = C x1 U1 (H, r2, r3) and G~ = C~ x1 U1~ (H, r2~, r3~)."""
        return _head_core(self.U1, self.core), _head_core(self.U1_tilde, self.core_tilde)

    def tensor_view(self, dtype: torch.dtype = torch.float64) -> AttentionFactors:
        """A_i = U2 G[i], B_i = U3; C_i = U2~ G~[i], D_i = U3~; the query bias seen through U3 (a key
        bias cancels at offset 0)."""
        if self.q_norm is not None:
            raise ValueError(f"TuckerAttention with qk_norm is not linear in x ({self.nonlinearity()}), so it has "
                             f"no tensor view")
        p = {name: t.detach().to(dtype) for name, t in self.named_parameters()}
        h = self.n_heads
        G, G_tilde = (_head_core(p[u], p[c]) for u, c in (("U1", "core"), ("U1_tilde", "core_tilde")))
        U3, U3_tilde = p["U3"], p.get("U3_tilde", p["U3"])
        key_bias = p["q_bias"] @ U3.T if "q_bias" in p else None
        return AttentionFactors(HeadFactors(p["U2"] @ G, U3.expand(h, -1, -1)),
                                HeadFactors(p["U2_tilde"] @ G_tilde, U3_tilde.expand(h, -1, -1)),
                                key_bias, p.get("out_bias"))

    def exact_tucker(self) -> dict:
        p = {name: t.detach().to(torch.float64) for name, t in self.named_parameters()}
        form = {"pre": (p["core"], (p["U1"], p["U2"], p["U3"])),
                "post": (p["core_tilde"], (p["U1_tilde"], p["U2_tilde"], p.get("U3_tilde", p["U3"]))),
                "shared_kv": self.shared_kv, "rope": self.rope, "rope_freqs": self.rope_freqs}
        if self.q_norm is not None:
            form["qk_norm"] = (p["q_norm.weight"], p["k_norm.weight"], self.norm_eps)
            form["out_bias"] = p.get("out_bias")
        return {**form, **{name: p[name] for name in ("q_bias", "k_bias") if name in p}}

    @classmethod
    def from_factors(cls, source: Attention, pre, post, *, key_bias=None, out_bias=None, q_bias=None, k_bias=None,
                     shared_kv: bool = False, rope: str | None = None, rope_freqs=None,
                     qk_norm=None) -> TuckerAttention:
        """A layer holding the Tucker pairs ``pre`` = (core, (U1, U2, U3)) and ``post`` (float64)
        with ``source``'s d_model, n_heads, causal, scale, dropout, rope_base, dtype and device.

        Query bias: ``q_bias`` (H, r3) in the latent, or ``key_bias`` (H, d), the query bias seen
        from the key side, fitted as q_bias with U3 q_bias_i ~ key_bias_i (exact when it lies in
        U3's span). k_bias (r3,): the latent key bias (RoPE only). out_bias (d). rope_freqs: the
        frequency of each latent pair (r3/2,), default ``source.rope_base ** (-2j / r3)``. qk_norm:
        (query gain (r3,), key gain (r3,), eps) of latent q/k RMSNorms, or None."""
        (core, (U1, U2, U3)), (core_t, (U1_t, U2_t, U3_t)) = pre, post
        bias = any(b is not None for b in (key_bias, out_bias, q_bias, k_bias))
        if k_bias is not None and rope is None and qk_norm is None:
            raise ValueError("k_bias is a latent key bias under RoPE or q/k norms; otherwise a key bias cancels in "
                             "softmax")
        layer = cls(source.d_model, source.n_heads, tuple(core.shape), value_ranks=tuple(core_t.shape),
                    shared_kv=shared_kv, causal=source.causal, rope=rope, dropout=source.dropout, bias=bias,
                    scale=source.scale, rope_base=source.rope_base,
                    rope_freqs=None if rope_freqs is None else [float(f) for f in rope_freqs],
                    qk_norm=qk_norm is not None, norm_eps=qk_norm[2] if qk_norm is not None else 1e-6)
        values = {"core": core, "U1": U1, "U2": U2, "U3": U3, "core_tilde": core_t, "U1_tilde": U1_t,
                  "U2_tilde": U2_t}
        if not shared_kv:
            values["U3_tilde"] = U3_t
        if bias:
            zeros = torch.zeros(source.n_heads, source.d_model, dtype=torch.float64)
            u = key_bias if key_bias is not None else zeros
            values["q_bias"] = (q_bias if q_bias is not None                            # u_i = U3 q_bias_i
                                else torch.linalg.lstsq(U3, u.T.to(U3.dtype)).solution.T)
            values["out_bias"] = out_bias if out_bias is not None else torch.zeros(source.d_model,
                                                                                   dtype=torch.float64)
            if layer.k_bias is not None:
                values["k_bias"] = k_bias if k_bias is not None else torch.zeros(U3.shape[1], dtype=torch.float64)
        if qk_norm is not None:
            values["q_norm.weight"], values["k_norm.weight"] = qk_norm[0], qk_norm[1]
        return layer.assign_parameters(values, like=source)

    def mode_spectra(self) -> dict[str, tuple[torch.Tensor | None, ...]]:
        """Singular values of the mode-k unfoldings of W and W_tilde, from the factors alone.

        Returns ``{"ranks": (s1, s2, s3), "value_ranks": (t1, t2, t3)}``: s_k (r_k,) float64 (CPU),
        descending, zero-padded to the current rank r_k (the unfolding has no further nonzero
        singular values). A mode whose basis cannot change is None: mode 3 of W under latent RoPE,
        and of W_tilde too with ``shared_kv``. With ``shared_kv`` and no RoPE both modes 3 share U3
        and report the spectrum of the joint unfolding [unfold_3(W), unfold_3(W_tilde)] (its
        squares sum to ||W||^2 + ||W_tilde||^2). See :mod:`.tucker_ranks`.
        """
        return tucker_ranks.mode_spectra(self)

    def pair_spectrum(self) -> torch.Tensor:
        """Under latent RoPE: (r3/2,) float64 energies, descending, of the key latent's best RoPE-exact
        pairs (directions mixing only pairs of one frequency; :mod:`.rope_pairs`), averaged over
        position offsets; joint with the values' with ``shared_kv``. :meth:`truncated` keeps the
        leading ones when it lowers r3."""
        return tucker_ranks.pair_spectrum(self)

    def truncated(self, ranks: tuple[int, int, int], value_ranks: tuple[int, int, int]) -> TuckerAttention:
        """A new layer holding the truncated HOSVD of W and W_tilde at ``ranks`` / ``value_ranks``.

        Factors Q_k P_k (orthonormal), core C x_k (P_k^T R_k) with P_k the leading left singular
        vectors of unfold_k(C') (:meth:`mode_spectra`); computed from the factors, exact at the
        current ranks. Each rank must be in [1, current]; modes that :meth:`mode_spectra` reports
        as None (the RoPE latent) keep their basis and latent coordinates at their current rank, and
        at a lower (even) one keep the leading pairs of :meth:`pair_spectrum`, each with its
        frequency (RoPE stays exact within them). The query bias follows the new key latent
        (q_bias_i -> P3^T R3 q_bias_i), the key bias too; the output bias is copied. Same d_model,
        n_heads, causal, rope (and its frequencies), rope_base, dropout,
        bias, shared_kv, dtype, device and train/eval mode; ``scale`` is fixed to this layer's
        effective scale (so the default 1/sqrt(r3) does not follow the new r3). Fresh parameters.
        """
        return tucker_ranks.truncated(self, ranks, value_ranks)

    def native_setting(self, method: str):
        return self.ranks if method == "tucker" else None

    def cache_spec(self) -> dict[str, tuple[int, int]]:
        r3, vr3 = self.ranks[2], self.value_ranks[2]
        return {"kv": (1, r3)} if self.shared_kv else {"k": (1, r3), "v": (1, vr3)}

    def derived_weights(self) -> dict[str, torch.Tensor]:
        """G as (r2, H*r3) and G~ as (H*r3~, r2~): one matrix product per side and token."""
        G, G_tilde = self.head_cores()
        return {"G": G.transpose(0, 1).reshape(G.shape[1], -1),                   # column i*r3 + b: G[i, :, b]
                "G_tilde": G_tilde.transpose(1, 2).reshape(-1, G_tilde.shape[1])}  # row i*r3~ + b: G~[i, :, b]

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) -> Q (B, H, T, r3) = (x U2) G[i] for every head."""
        batch, steps, _ = x.shape
        (r1, r2, r3), heads = self.core.shape, self.n_heads                         # r3: the query width
        xq = (x @ self.U2).reshape(batch * steps, r2)                              # (N, r2)
        layout = self._derived("G")
        if layout is None and _factored_first(batch * steps, heads, r1, r2, r3):
            z = torch.matmul(xq, self.core)                                         # (r1, N, r3)
            q = (self.U1 @ z.reshape(r1, -1)).view(heads, batch, steps, r3)        # (H, B, T, r3)
            return q.permute(1, 0, 2, 3)
        if layout is None:
            layout = self.derived_weights()["G"]
        q = xq @ layout                                                             # (N, H*r3)
        return q.view(batch, steps, heads, r3).transpose(1, 2)

    def _project(self, x, rope):
        q = self._queries(x)                                                        # (B, H, T, r3)
        if self.q_bias is not None:
            q = q + self.q_bias[:, None, :]
        k = (x @ self.U3).unsqueeze(1)                                              # (B, 1, T, r3)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if rope is not None:
            q = apply_rope(q, *rope)
        if self.shared_kv:
            return q, {"kv": k}                        # cached unrotated (values); keys made on read
        if self.k_bias is not None:
            k = k + self.k_bias
        if self.k_norm is not None:
            k = self.k_norm(k)
        if rope is not None:
            k = apply_rope(k, *rope)
        return q, {"k": k, "v": (x @ self.U3_tilde).unsqueeze(1)}                 # v (B, 1, T, r3~)

    def _keys_values(self, entries, rope):
        """A shared latent's key copy gets the key bias before it is rotated; its values do not."""
        if self.k_bias is None or "kv" not in entries:
            return super()._keys_values(entries, rope)
        latent = entries["kv"]
        return apply_rope(latent + self.k_bias, *rope.key(self.rotary, latent.dtype)), latent

    def _output(self, o):
        batch, heads, steps, vr3 = o.shape
        vr1, vr2, _ = self.value_ranks
        tokens = batch * steps
        layout = self._derived("G_tilde")
        if layout is None and _factored_first(tokens, heads, vr1, vr2, vr3):
            z = self.U1_tilde.T @ o.transpose(0, 1).reshape(heads, tokens * vr3)   # (r1~, N*r3~)
            z = torch.matmul(z.view(vr1, tokens, vr3), self.core_tilde.transpose(1, 2)).sum(0)   # (N, r2~)
        else:
            if layout is None:
                layout = self.derived_weights()["G_tilde"]
            z = o.transpose(1, 2).reshape(tokens, heads * vr3) @ layout             # (N, r2~)
        y = (z @ self.U2_tilde.T).view(batch, steps, self.d_model)                  # (B, T, d)
        return y if self.out_bias is None else y + self.out_bias

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, ranks={self.ranks}, "
                f"value_ranks={self.value_ranks}, shared_kv={self.shared_kv}, causal={self.causal}, "
                f"rope={self.rope!r}")

