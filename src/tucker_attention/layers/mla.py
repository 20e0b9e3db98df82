"""Multi-head latent attention (DeepSeek-V2), run with absorbed weights over its latent.

Keys and values come from a latent c = x W^DKV of width ``kv_rank`` shared by all heads::

    c_q = x W^DQ (q_rank)          q_i = c_q W^UQ_i (head_dim)      [q_rank=None: q_i = x W^Q_i]
    c   = x W^DKV (kv_rank)        k_i = c W^UK_i,  v_i = c W^UV_i  (head_dim)
    y   = concat_i softmax(scale q_i k_i^T) v_i  W^O

Absorbing W^UK into the query and W^UV into the output turns this into multi-query
attention over the latent (PAPER.md §4, Thm. B.4): q~_i = q_i W^UK_i^T (B, H, T, kv_rank)
against K = V = c (B, 1, S, kv_rank), then o_i W^UV_i. That is how it always runs here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_even, check_int, resolve_head_dim
from .base import ATTENTION_METHODS, Attention
from .factors import AttentionFactors, HeadFactors, head_blocks
from .norms import fold_scales, inverse_rms
from .rope import apply_rope

ROPE_MODES = (None, "decoupled", "latent")


class MultiHeadLatentAttention(Attention):
    """MLA with a K/V latent of width ``kv_rank`` (DeepSeek-V2, linear form by default).

    RoPE (``rope``; the modes of every layer are in the ``Attention`` docstring):
      - ``None`` (or False): none.
      - ``'decoupled'``: DeepSeek's extra branch: per-head rotated queries c_q W^QR_i and one
        shared rotated key x W^KR, both of width ``rope_dim``, concatenated to the latent
        query/key (scale default ``1/sqrt(head_dim + rope_dim)``).
      - ``'latent'`` (or True): the paper's coupled RoPE (Cor. 3.2.1): rotate the kv_rank-dim latent
        itself. Nothing sits between W^DQ, W^UQ_i and W^UK_i any more, so the whole query
        side fuses into one matrix per head (:meth:`absorbed_query_weight`).

    Cache per token: the latent ``kv`` (kv_rank; with 'decoupled' one row [latent, rotated
    RoPE key] of width kv_rank + rope_dim); with ``shared_kv=False`` a key latent ``k`` (same
    width) and a value latent ``v`` (kv_rank). The latent is cached unrotated for 'latent' RoPE
    (values need it so) and its key copy rotated on read.
    Init: every projection N(0, 1/fan_in), so for unit-variance x the latents, per-head
    queries/keys/values have unit variance and the output matches MHA's.

    Args:
        d_model, n_heads: width d and query heads H. kv_rank: latent width d_c (<= d_model; under
            latent RoPE <= 2 d_model: a converted head-RoPE model's key pairs and value dims).
        q_rank: query latent width d_c' (None: full-rank query projection).
        head_dim: per-head width; default d_model // n_heads.
        rope: None | 'decoupled' | 'latent'. rope_dim: decoupled RoPE width (default head_dim // 2).
        shared_kv: one latent for keys and values (DeepSeek); False: separate latents.
        latent_norm: RMSNorm on the latents (as in DeepSeek's weights); off by default so
            the layer stays linear and the paper's tensor view applies (:meth:`nonlinearity`
            says so; :meth:`linearized` folds the norms into the down-projections). norm_eps:
            its epsilon.
        causal, dropout, scale, rope_base, rope_freqs: as on every layer (latent RoPE: one frequency
            per latent pair). bias: query and output biases.
        down_bias: biases on the down-projections W^DQ, W^DKV (and W^KR), DeepSeek's
            ``attention_bias``.
    """

    def __init__(self, d_model: int, n_heads: int, kv_rank: int, *, q_rank: int | None = None,
                 head_dim: int | None = None, rope: str | None = None, rope_dim: int | None = None,
                 shared_kv: bool = True, latent_norm: bool = False, norm_eps: float = 1e-6, causal: bool = False,
                 dropout: float = 0.0, bias: bool = False, down_bias: bool = False, scale: float | None = None,
                 rope_base: float = 10000.0, rope_freqs: tuple[float, ...] | None = None):
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        rope = self.rope_mode(rope)
        check_int("kv_rank", kv_rank, high=2 * d_model if rope == "latent" else d_model)   # keys' pairs + values
        if q_rank is not None:
            check_int("q_rank", q_rank, high=d_model)
        if not (isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool) and 0 < norm_eps < 1):
            raise ValueError(f"norm_eps must be a float in (0, 1), got {norm_eps!r}")
        head_dim = resolve_head_dim(d_model, n_heads, head_dim)
        if rope == "decoupled":
            rope_dim = check_even("rope_dim", check_int("rope_dim", rope_dim if rope_dim is not None
                                                        else max(2, head_dim // 2 // 2 * 2)))
        elif rope_dim is not None:
            raise ValueError(f"rope_dim is only used with rope='decoupled', got rope={rope!r}, rope_dim={rope_dim}")
        elif rope == "latent":
            rope_dim = check_even("kv_rank (the latent RoPE width)", kv_rank)
        qk_dim = head_dim + (rope_dim if rope == "decoupled" else 0)
        super().__init__(d_model, n_heads, causal=causal, dropout=dropout, scale=scale,
                         default_scale=1.0 / math.sqrt(qk_dim), rope=rope, rope_dim=rope_dim, rope_base=rope_base,
                         rope_freqs=rope_freqs)
        self.kv_rank, self.q_rank, self.head_dim = kv_rank, q_rank, head_dim
        self.rope_dim, self.shared_kv = rope_dim if rope == "decoupled" else None, bool(shared_kv)
        self.norm_eps = float(norm_eps)
        q_in = q_rank if q_rank is not None else d_model
        linear = nn.Linear
        self.q_down = linear(d_model, q_rank, bias=down_bias) if q_rank is not None else None
        self.q_up = linear(q_in, n_heads * head_dim, bias=bias)
        self.kv_down = linear(d_model, kv_rank if shared_kv else 2 * kv_rank, bias=down_bias)
        self.k_up = linear(kv_rank, n_heads * head_dim, bias=False)
        self.v_up = linear(kv_rank, n_heads * head_dim, bias=False)
        self.o_proj = linear(n_heads * head_dim, d_model, bias=bias)
        self.q_rope = linear(q_in, n_heads * rope_dim, bias=False) if rope == "decoupled" else None
        self.k_rope = linear(d_model, rope_dim, bias=down_bias) if rope == "decoupled" else None
        self.q_norm = nn.RMSNorm(q_rank, eps=self.norm_eps) if latent_norm and q_rank is not None else None
        self.kv_norm = nn.RMSNorm(kv_rank, eps=self.norm_eps) if latent_norm else None
        self.reset_parameters()

    method = "mla"
    rope_modes = ROPE_MODES
    positional_rope = "latent"

    def config(self) -> dict:
        return {**self._common_config(), "kv_rank": self.kv_rank, "q_rank": self.q_rank, "head_dim": self.head_dim,
                "rope_dim": self.rope_dim, "shared_kv": self.shared_kv, "latent_norm": self.kv_norm is not None,
                "norm_eps": self.norm_eps, "bias": self.q_up.bias is not None,
                "down_bias": self.kv_down.bias is not None}

    def _reference_weight(self) -> torch.Tensor:
        return self.kv_down.weight

    def native_setting(self, method: str):
        return self.kv_rank if method == "mla" else None

    def nonlinearity(self) -> str | None:
        if self.kv_norm is not None:
            return "RMSNorm on the latents (latent_norm: DeepSeek q_a_layernorm, kv_a_layernorm)"
        return None

    def linearized(self, input_cov: torch.Tensor | None = None) -> MultiHeadLatentAttention:
        """Without ``latent_norm``: this layer. With it: the same layer without the norms, each
        down-projection's rows scaled by its norm's gain times the latent's expected 1/rms
        (:func:`~.norms.inverse_rms` on inputs of second moment ``input_cov`` (d, d); None:
        isotropic unit-variance inputs; a separate key and value latent each get their own).
        The decoupled RoPE key (x W^KR) has no norm and is kept. Exact when every input gives
        the latents the rms the estimate assumes; otherwise the nearest linear layer."""
        if self.kv_norm is None:
            return self
        ref = self.kv_down.weight
        config = {k: v for k, v in self.config().items() if k != "method"}
        linear = ATTENTION_METHODS[self.method](**{**config, "latent_norm": False})
        linear.load_state_dict({k: v for k, v in self.state_dict().items()
                                if not k.startswith(("q_norm.", "kv_norm."))})
        linear = linear.to(device=ref.device, dtype=torch.float64)
        gain = self.kv_norm.weight.detach().to(device=ref.device, dtype=torch.float64)
        groups = 1 if self.shared_kv else 2
        scale = inverse_rms(linear.kv_down.weight, linear.kv_down.bias, groups, self.norm_eps, input_cov)
        fold_scales(linear.kv_down, (scale[:, None] * gain[None, :]).reshape(-1))
        if self.q_norm is not None:
            gain = self.q_norm.weight.detach().to(device=ref.device, dtype=torch.float64)
            scale = inverse_rms(linear.q_down.weight, linear.q_down.bias, 1, self.norm_eps, input_cov)
            fold_scales(linear.q_down, scale * gain)
        return linear.to(dtype=ref.dtype).train(self.training)

    def init_stds(self) -> dict[str, float]:
        return {f"{name}.weight": module.in_features ** -0.5 for name, module in self.named_children()
                if isinstance(module, nn.Linear)}

    def input_weights(self) -> dict[str, str]:
        names = ["q_down.weight" if self.q_down is not None else "q_up.weight", "kv_down.weight"]
        return dict.fromkeys(names + (["k_rope.weight"] if self.k_rope is not None else []), "linear")

    def cache_spec(self) -> dict[str, tuple[int, int]]:
        key_width = self.kv_rank + (self.rope_dim or 0)    # decoupled RoPE: [latent, rotated key] in one row
        return {"kv": (1, key_width)} if self.shared_kv else {"k": (1, key_width), "v": (1, self.kv_rank)}

    def absorbed_query_weight(self) -> torch.Tensor:
        """W^UQ_i W^UK_i^T for every head: (q_in, H, kv_rank), q_in = q_rank or d_model.

        Without decoupled RoPE, q~_i = c_q @ this[:, i] (+ the absorbed query bias), i.e. the
        query side is one matrix per head.
        """
        w_uq = self.q_up.weight.view(self.n_heads, self.head_dim, -1)   # (H, head_dim, q_in)
        w_uk = self.k_up.weight.view(self.n_heads, self.head_dim, -1)   # (H, head_dim, kv_rank)
        return torch.einsum("hdq,hdc->qhc", w_uq, w_uk)

    def _latents(self, x):
        """x (B, T, d) -> c_q (B, T, q_in), key latent and value latent (B, 1, T, kv_rank)."""
        c_q = x if self.q_down is None else self.q_down(x)
        if self.q_norm is not None:
            c_q = self.q_norm(c_q)
        c_kv = self.kv_down(x).unsqueeze(1)
        c_k, c_v = (c_kv, c_kv) if self.shared_kv else c_kv.split(self.kv_rank, dim=-1)
        if self.kv_norm is not None:
            c_k = self.kv_norm(c_k)
            c_v = c_k if self.shared_kv else self.kv_norm(c_v)
        return c_q, c_k, c_v

    def _project(self, x, rope):
        batch, steps, _ = x.shape
        c_q, c_k, c_v = self._latents(x)
        q = self.q_up(c_q).view(batch, steps, self.n_heads, self.head_dim)               # (B, T, H, hd)
        w_uk = self.k_up.weight.view(self.n_heads, self.head_dim, self.kv_rank)
        q = torch.einsum("bthd,hdc->bhtc", q, w_uk)                                        # (B, H, T, kv_rank)
        if self.rope == "latent":
            q, c_k = apply_rope(q, *rope), (c_k if self.shared_kv else apply_rope(c_k, *rope))
        elif self.rope == "decoupled":
            q_r = self.q_rope(c_q).view(batch, steps, self.n_heads, self.rope_dim).transpose(1, 2)
            q = torch.cat([q, apply_rope(q_r, *rope)], dim=-1)                             # (B, H, T, kv_rank+dr)
            c_k = torch.cat([c_k, apply_rope(self.k_rope(x).unsqueeze(1), *rope)], dim=-1)  # (B, 1, T, kv_rank+dr)
        # With a shared latent and decoupled RoPE the values are read through the key row
        # itself (its first kv_rank columns): equal q/k/v widths reach flash kernels, no value
        # copy is made, and _output drops the extra columns.
        return q, ({"kv": c_k} if self.shared_kv else {"k": c_k, "v": c_v})

    def _output(self, o):
        batch, _, steps, _ = o.shape
        w_uv = self.v_up.weight.view(self.n_heads, self.head_dim, self.kv_rank)
        heads = torch.einsum("bhtc,hdc->bthd", o[..., :self.kv_rank], w_uv)                 # (B, T, H, hd)
        return self.o_proj(heads.reshape(batch, steps, self.n_heads * self.head_dim))

    def tensor_view(self, dtype: torch.dtype = torch.float64) -> AttentionFactors:
        """A_i = W^DQ W^UQ_i (with the decoupled RoPE query appended), B_i = W^DK W^UK_i (+ the RoPE
        key), C_i = W^O_i^T, D_i = W^DV W^UV_i. Query-side biases are seen from the key side;
        the value latent's bias, through W^UV and W^O, joins the output bias; key-side biases cancel."""
        if self.kv_norm is not None or self.q_norm is not None:
            raise ValueError("MultiHeadLatentAttention with latent_norm=True is not linear in x (RMSNorm on the "
                             "latents), so it has no attention tensors; use latent_norm=False or "
                             "layer.linearized(input_cov) for the nearest linear layer")
        p = {name: t.detach().to(dtype) for name, t in self.named_parameters()}
        h, d = self.n_heads, self.d_model
        w_dq = p["q_down.weight"].T if self.q_down is not None else torch.eye(d, dtype=dtype)
        w_dkv = p["kv_down.weight"].T
        w_dk, w_dv = (w_dkv, w_dkv) if self.shared_kv else w_dkv.split(self.kv_rank, dim=1)
        w_uq = head_blocks(p["q_up.weight"], h)                                        # (h, q_in, hd)
        A, B = w_dq @ w_uq, w_dk @ head_blocks(p["k_up.weight"], h)                    # (h, d, hd)
        q_const = None                                                                 # (h, hd): constant query term
        if "q_down.bias" in p or "q_up.bias" in p:
            q_const = torch.zeros(h, self.head_dim, dtype=dtype)
            if "q_down.bias" in p:
                q_const = q_const + p["q_down.bias"] @ w_uq
            if "q_up.bias" in p:
                q_const = q_const + p["q_up.bias"].view(h, -1)
        if self.rope == "decoupled":                                                   # offset-0 RoPE term
            w_qr = head_blocks(p["q_rope.weight"], h)
            A = torch.cat([A, w_dq @ w_qr], dim=-1)
            B = torch.cat([B, p["k_rope.weight"].T.expand(h, -1, -1)], dim=-1)
            if q_const is not None:
                rope_const = (p["q_down.bias"] @ w_qr if "q_down.bias" in p
                              else torch.zeros(h, self.rope_dim, dtype=dtype))
                q_const = torch.cat([q_const, rope_const], dim=-1)
        C, D = head_blocks(p["o_proj.weight"].T, h), w_dv @ head_blocks(p["v_up.weight"], h)
        key_bias = None if q_const is None else torch.einsum("idk,ik->id", B, q_const)
        out_bias = p.get("o_proj.bias")
        if "kv_down.bias" in p:
            b_dv = p["kv_down.bias"] if self.shared_kv else p["kv_down.bias"][self.kv_rank:]
            v_const = b_dv @ head_blocks(p["v_up.weight"], h)                        # (h, hd)
            passed = torch.einsum("idk,ik->d", C, v_const)
            out_bias = passed if out_bias is None else out_bias + passed
        return AttentionFactors(HeadFactors(A, B), HeadFactors(C, D), key_bias, out_bias)

    def exact_tucker(self) -> dict:
        """Thm. B.4: U2 = W^DQ (I without a query latent), U3 = W^DKV, core[i] = W^UQ_i W^UK_i^T;
        W_tilde with U2~ = W^O, U3~ = W^DV and core~[i] routing head i's block to W^UV_i. A shared
        latent stays shared. Coupled RoPE becomes latent RoPE with the same frequencies; decoupled
        RoPE too: the latent's pairs get frequency 0 (not rotated) and the RoPE key joins them with
        its own frequencies (the query's RoPE branch beside the absorbed query). Under RoPE the
        down-projection biases become latent key biases."""
        if self.kv_norm is not None or self.q_norm is not None:
            raise ValueError("MultiHeadLatentAttention with latent_norm=True is not linear in x (RMSNorm on the "
                             "latents), so it has no exact Tucker form; use latent_norm=False or "
                             "layer.linearized(input_cov) for the nearest linear layer")
        p = {name: t.detach().to(torch.float64) for name, t in self.named_parameters()}
        h, d, hd, kv = self.n_heads, self.d_model, self.head_dim, self.kv_rank
        w_dq = p["q_down.weight"].T if self.q_down is not None else torch.eye(d, dtype=torch.float64)
        w_dk, w_dv = ((p["kv_down.weight"].T,) * 2 if self.shared_kv else p["kv_down.weight"].T.split(kv, dim=1))
        core = self.absorbed_query_weight().detach().to(torch.float64).permute(1, 0, 2)   # (h, q_in, kv_rank)
        core_t = torch.zeros(h, h * hd, kv, dtype=torch.float64)
        for i in range(h):
            core_t[i, i * hd:(i + 1) * hd] = p["v_up.weight"][i * hd:(i + 1) * hd]
        eye = torch.eye(h, dtype=torch.float64)
        form = {"pre": (core, (eye, w_dq, w_dk)), "post": (core_t, (eye, p["o_proj.weight"], w_dv)),
                "shared_kv": self.shared_kv, "rope": self.rope, "rope_freqs": None}
        if self.rope is None:
            return form
        zeros = torch.zeros
        q_const = zeros(h, hd, dtype=torch.float64)                          # the query's constant term
        if "q_down.bias" in p:
            q_const = q_const + torch.einsum("q,hqd->hd", p["q_down.bias"], head_blocks(p["q_up.weight"], h))
        if "q_up.bias" in p:
            q_const = q_const + p["q_up.bias"].view(h, hd)
        q_bias = torch.einsum("hd,hdc->hc", q_const, p["k_up.weight"].view(h, hd, kv))
        k_bias = p["kv_down.bias"][:kv] if "kv_down.bias" in p else zeros(kv, dtype=torch.float64)
        freqs = self.rotary.inv_freq
        if self.rope == "decoupled":                                         # [latent | RoPE key] as latent pairs
            pad = kv % 2                                                     # an odd latent: one dead column
            w_qr = head_blocks(p["q_rope.weight"], h)                        # (h, q_in, rope_dim)
            r_bias = (torch.einsum("q,hqr->hr", p["q_down.bias"], w_qr) if "q_down.bias" in p
                      else zeros(h, self.rope_dim, dtype=torch.float64))
            core = torch.cat([core, zeros(h, core.shape[1], pad, dtype=torch.float64), w_qr], -1)
            w_dk = torch.cat([w_dk, zeros(d, pad, dtype=torch.float64), p["k_rope.weight"].T], 1)
            q_bias = torch.cat([q_bias, zeros(h, pad, dtype=torch.float64), r_bias], -1)
            k_rope_bias = p["k_rope.bias"] if "k_rope.bias" in p else zeros(self.rope_dim, dtype=torch.float64)
            k_bias = torch.cat([k_bias, zeros(pad, dtype=torch.float64), k_rope_bias])
            half, rope_half = (kv + pad) // 2, self.rope_dim // 2
            latent, rope = torch.arange(kv + pad), kv + pad + torch.arange(self.rope_dim)
            order = torch.cat([latent[:half], rope[:rope_half], latent[half:], rope[rope_half:]])
            core, w_dk, q_bias, k_bias = core[..., order], w_dk[:, order], q_bias[:, order], k_bias[order]
            freqs = torch.cat([zeros(half, dtype=torch.float64), freqs])
            if self.shared_kv:                                               # values read the latent's columns
                core_t = torch.cat([core_t, zeros(h, h * hd, pad + self.rope_dim, dtype=torch.float64)], -1)
                w_dv, core_t = w_dk, core_t[..., order]
            form.update(pre=(core, (eye, w_dq, w_dk)), post=(core_t, (eye, p["o_proj.weight"], w_dv)))
        form.update(rope="latent", rope_freqs=freqs.tolist())
        has_bias = any(name in p for name in ("q_down.bias", "q_up.bias", "kv_down.bias", "k_rope.bias"))
        return {**form, **({"q_bias": q_bias, "k_bias": k_bias} if has_bias else {})}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, kv_rank={self.kv_rank}, q_rank={self.q_rank}, "
                f"head_dim={self.head_dim}, rope={self.rope!r}, shared_kv={self.shared_kv}, causal={self.causal}")
