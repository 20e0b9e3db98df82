"""Multi-head, grouped-query and multi-query attention: one implementation.

MHA is GQA with ``n_kv_heads == n_heads``; MQA is GQA with ``n_kv_heads == 1``
(PAPER.md §4: Tucker ranks (h, d, n_kv * head_dim) for both tensors).
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

    With ``qk_norm`` each head's query and key go through an RMSNorm over ``head_dim`` (one gain
    shared by all query heads, one by all key heads) before RoPE, as in Qwen3 and Gemma 3::

        q_i = RMSNorm_q(x W^Q_i),  k_g = RMSNorm_k(x W^K_g)

    That norm makes the layer non-linear in x (:meth:`nonlinearity`): it has no tensor view
    and no exact Tucker form; :meth:`linearized` gives the nearest linear layer.

    Cache per token: ``k`` and ``v``, each (n_kv_heads, head_dim). Init: every projection
    N(0, 1/fan_in), so unit-variance x gives unit-variance q, k, v and an output whose
    variance equals that of the attention-weighted values; norm gains one.

    Args:
        d_model: width d of input and output.
        n_heads: query heads H.
        n_kv_heads: key/value heads; must divide ``n_heads``.
        head_dim: per-head width; default ``d_model // n_heads`` (then ``d_model % n_heads == 0``).
        causal: mask future tokens. rope: ``'head'`` (or True): head-dimension RoPE on q and k; None/False: none.
        rope_dim: width of each head that RoPE rotates: the first ``rope_dim`` dims (rotate-half
            within them, as GPT-NeoX / Phi partial rotary), the rest pass unrotated; default
            ``head_dim``. Even, <= head_dim; kept (unused) without RoPE.
        dropout: attention-probability dropout in training. bias: biases on q, k, v, o.
        scale: logit scale; default ``1/sqrt(head_dim)``. rope_base: RoPE frequency base.
        qk_norm: per-head RMSNorm on q and k before RoPE (parameters ``q_norm.weight``,
            ``k_norm.weight``, each (head_dim,)). norm_eps: its epsilon.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, head_dim: int | None = None,
                 causal: bool = False, rope: str | bool | None = None, rope_dim: int | None = None,
                 dropout: float = 0.0, bias: bool = False, scale: float | None = None, rope_base: float = 10000.0,
                 qk_norm: bool = False, norm_eps: float = 1e-6, rope_freqs: tuple[float, ...] | None = None):
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        check_int("n_kv_heads", n_kv_heads, high=n_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be divisible by n_kv_heads={n_kv_heads}; "
                             f"allowed n_kv_heads: {[g for g in range(1, n_heads + 1) if n_heads % g == 0]}")
        head_dim = resolve_head_dim(d_model, n_heads, head_dim)
        rope = self.rope_mode(rope)
        if rope_dim is not None:
            check_even("rope_dim", check_int("rope_dim", rope_dim, high=head_dim))
        elif rope:
            check_even("head_dim (the RoPE width)", head_dim)
        if not (isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool) and 0 < norm_eps < 1):
            raise ValueError(f"norm_eps must be a float in (0, 1), got {norm_eps!r}")
        rotated = head_dim if rope_dim is None else rope_dim
        super().__init__(d_model, n_heads, causal=causal, dropout=dropout, scale=scale,
                         default_scale=1.0 / math.sqrt(head_dim), rope=rope, rope_dim=rotated, rope_base=rope_base,
                         rope_freqs=rope_freqs)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.rope_dim = None if rotated == head_dim else rotated          # None: the whole head
        self.norm_eps = float(norm_eps)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=self.norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=self.norm_eps) if qk_norm else None
        self.reset_parameters()

    method = "gqa"
    rope_modes = (None, "head")
    positional_rope = "head"

    def config(self) -> dict:
        return {**self._common_config(), **self._group_config(), "head_dim": self.head_dim,
                "rope_dim": self.rope_dim, "bias": self.q_proj.bias is not None,
                "qk_norm": self.q_norm is not None, "norm_eps": self.norm_eps}

    def nonlinearity(self) -> str | None:
        if self.q_norm is not None:
            return "per-head RMSNorm on queries and keys before RoPE (qk_norm: Qwen3 / Gemma 3 q_norm, k_norm)"
        return None

    def linearized(self, input_cov: torch.Tensor | None = None) -> GroupedQueryAttention:
        """Without ``qk_norm``: this layer. With it: the same layer without the norms, each head's
        q_proj (k_proj) rows scaled by the norm's gain times that head's expected 1/rms
        (:func:`~.norms.inverse_rms` on inputs of second moment ``input_cov`` (d, d); None:
        isotropic unit-variance inputs). Exact when every input gives each head the rms the
        estimate assumes; otherwise the nearest linear layer, so the tensor view applies."""
        if self.q_norm is None:
            return self
        ref = self.q_proj.weight
        config = {k: v for k, v in self.config().items() if k != "method"}
        linear = ATTENTION_METHODS[self.method](**{**config, "qk_norm": False}).to(device=ref.device,
                                                                                  dtype=torch.float64)
        linear.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith(("q_norm.", "k_norm."))})
        for proj, norm, heads in ((linear.q_proj, self.q_norm, self.n_heads),
                                  (linear.k_proj, self.k_norm, self.n_kv_heads)):
            scale = inverse_rms(proj.weight, proj.bias, heads, self.norm_eps, input_cov)      # (heads,)
            gain = norm.weight.detach().to(device=ref.device, dtype=torch.float64)            # (head_dim,)
            fold_scales(proj, (scale[:, None] * gain[None, :]).reshape(-1))
        return linear.to(dtype=ref.dtype).train(self.training)

    def native_setting(self, method: str):
        return self.n_kv_heads if method == "gqa" else None

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

    def value_inputs(self) -> tuple[str, ...]:
        return ("v_proj.weight",)

    def tensor_view(self, dtype: torch.dtype = torch.float64) -> AttentionFactors:
        """W[i] = W^Q_i W^K_g(i)^T, W_tilde[i] = (W^V_g(i) W^O_i)^T; the query bias seen from the
        key side, value biases passed into the output bias. RoPE (whole-head or partial) is ignored:
        these are the weights at offset 0."""
        self._check_linear("tensor view")
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
        to its key group; the same for W_tilde with W^O and W^V.

        Under head RoPE the key heads are stacked as latent RoPE pairs (:meth:`latent_pairs`): the
        latent pair of head g's pair j carries that pair's frequency, a partial-RoPE head's other
        dims become pairs of frequency 0, and the query and key biases latent biases, so the
        latent-RoPE Tucker layer computes the same logits at every position. With ``qk_norm`` and one
        key head the latent is that head, so the norms become the latent's (:meth:`exact_with_norms`)."""
        if not self.exact_with_norms():
            self._check_linear("exact Tucker form")
        p = {name: t.detach().to(torch.float64) for name, t in self.named_parameters()}
        h = self.n_heads
        eye = torch.eye(h, dtype=torch.float64)
        route = routing_core(h, self.head_dim, h // self.n_kv_heads)
        form = {"pre": (route, (eye, p["q_proj.weight"].T, p["k_proj.weight"].T)),
                "post": (route.clone(), (eye, p["o_proj.weight"], p["v_proj.weight"].T)),
                "shared_kv": False, "rope": None, "rope_freqs": None}
        if self.rope is None and self.q_norm is None:
            return form
        order, freqs = self.latent_pairs() if self.rope is not None else (torch.arange(self.head_dim), None)
        form["pre"] = (route[:, :, order], (eye, p["q_proj.weight"].T, p["k_proj.weight"].T[:, order]))
        if self.rope is not None:
            form.update(rope="latent", rope_freqs=freqs.tolist())
        if self.q_norm is not None:                   # one key head: its dims are the latent's
            form["qk_norm"] = (p["q_norm.weight"][order], p["k_norm.weight"][order], self.norm_eps)
            form["out_bias"] = self._passed_out_bias(p)
        if "q_proj.bias" in p:                        # latent biases: a key bias neither cancels under RoPE nor a norm
            form["q_bias"] = torch.einsum("a,iab->ib", p["q_proj.bias"], route)[:, order]   # (h, n_kv*hd)
            form["k_bias"] = p["k_proj.bias"][order]
        return form

    def exact_with_norms(self) -> bool:
        return self.q_norm is not None and self.n_kv_heads == 1

    def keeps_key_heads(self) -> bool:
        """q/k norms on whole heads (no partial RoPE) and no projection biases."""
        return (self.q_norm is not None and self.q_proj.bias is None
                and self.config().get("rope_dim") in (None, self.head_dim))

    def key_heads_form(self) -> dict:
        if not self.keeps_key_heads():
            reason = "no q/k norms" if self.q_norm is None else "projection biases or partial head RoPE"
            raise ValueError(f"this layer's q/k norms are not kept as key heads: it has {reason}")
        weight = {name: t.detach().to("cpu", torch.float64) for name, t in self.named_parameters()}
        return {"query": weight["q_proj.weight"], "key": weight["k_proj.weight"], "q_gain": weight["q_norm.weight"],
                "k_gain": weight["k_norm.weight"], "key_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "norm_eps": self.norm_eps}

    def _passed_out_bias(self, p: dict) -> torch.Tensor | None:
        """The output bias with the value biases passed through softmax (None without biases)."""
        if "o_proj.bias" not in p:
            return None
        group = torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)
        C = head_blocks(p["o_proj.weight"].T, self.n_heads)
        return p["o_proj.bias"] + torch.einsum("idk,ik->d", C, p["v_proj.bias"].view(self.n_kv_heads, -1)[group])

    def latent_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order (n_kv*hd,), frequencies (n_kv*hd/2,)): the stacked key heads' columns in latent
        RoPE pair layout (first coordinates of every pair, then the second ones) and each pair's
        frequency. Head g's rotated pair j (dims j, j + rope_dim/2) keeps its frequency; the
        unrotated dims of a partial-RoPE head pair up with frequency 0."""
        hd, rotated = self.head_dim, self.rope_dim or self.head_dim
        if (hd - rotated) % 2:
            raise ValueError(f"a latent RoPE form pairs the {hd - rotated} unrotated dims of each head "
                             f"(head_dim={hd}, rope_dim={rotated}), which needs an even count")
        inv_freq = self.rotary.inv_freq
        firsts, seconds, freqs = [], [], []
        for g in range(self.n_kv_heads):
            start, rest = g * hd, (hd - rotated) // 2
            firsts += [start + j for j in range(rotated // 2)] + [start + rotated + u for u in range(rest)]
            seconds += [start + rotated // 2 + j for j in range(rotated // 2)] + [
                start + rotated + rest + u for u in range(rest)]
            freqs.append(torch.cat([inv_freq, inv_freq.new_zeros(rest)]))
        return torch.tensor(firsts + seconds), torch.cat(freqs)

    def _check_linear(self, what: str) -> None:
        reason = self.nonlinearity()
        if reason is not None:
            raise ValueError(f"{type(self).__name__} is not linear in x ({reason}), so it has no {what}; "
                             f"use layer.linearized(input_cov) for the nearest linear layer")

    def cache_spec(self) -> dict[str, tuple[int, int]]:
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        batch, steps, _ = t.shape
        return t.view(batch, steps, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def _project(self, x, rope):
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope), self._rotate(k, rope)
        return q, {"k": k, "v": self._heads(self.v_proj(x), self.n_kv_heads)}

    def _rotate(self, t: torch.Tensor, rope) -> torch.Tensor:
        """RoPE on the first rope_dim dims of each head (all of them by default)."""
        if self.rope_dim is None:
            return apply_rope(t, *rope)
        return torch.cat([apply_rope(t[..., :self.rope_dim], *rope), t[..., self.rope_dim:]], dim=-1)

    def _output(self, o):
        batch, _, steps, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(batch, steps, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        extra = (f", rope_dim={self.rope_dim}" if self.rope_dim is not None else "") + (
            f", qk_norm=True, norm_eps={self.norm_eps}" if self.q_norm is not None else "")
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, rope={self.rope!r}{extra}")


class MultiHeadAttention(GroupedQueryAttention):
    """Standard multi-head attention (Vaswani et al. 2017): GQA with ``n_kv_heads == n_heads``.

    Cache per token: ``k``, ``v`` each (n_heads, head_dim), i.e. 2 d_model floats.
    """

    method = "mha"

    def native_setting(self, method: str):
        return self.n_kv_heads if method == "gqa" else None

    def _group_config(self) -> dict:
        return {}

    def __init__(self, d_model: int, n_heads: int, *, head_dim: int | None = None, causal: bool = False,
                 rope: str | bool | None = None, rope_dim: int | None = None, dropout: float = 0.0,
                 bias: bool = False, scale: float | None = None, rope_base: float = 10000.0, qk_norm: bool = False,
                 norm_eps: float = 1e-6, rope_freqs: tuple[float, ...] | None = None):
        check_int("n_heads", n_heads)
        super().__init__(d_model, n_heads, n_heads, head_dim=head_dim, causal=causal, rope=rope, rope_dim=rope_dim,
                         dropout=dropout, bias=bias, scale=scale, rope_base=rope_base, qk_norm=qk_norm,
                         norm_eps=norm_eps, rope_freqs=rope_freqs)


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention (Shazeer 2019): GQA with one key/value head."""

    method = "mqa"

    def native_setting(self, method: str):
        return self.n_kv_heads if method == "gqa" else None

    def _group_config(self) -> dict:
        return {}

    def __init__(self, d_model: int, n_heads: int, *, head_dim: int | None = None, causal: bool = False,
                 rope: str | bool | None = None, rope_dim: int | None = None, dropout: float = 0.0,
                 bias: bool = False, scale: float | None = None, rope_base: float = 10000.0, qk_norm: bool = False,
                 norm_eps: float = 1e-6, rope_freqs: tuple[float, ...] | None = None):
        super().__init__(d_model, n_heads, 1, head_dim=head_dim, causal=causal, rope=rope, rope_dim=rope_dim,
                         dropout=dropout, bias=bias, scale=scale, rope_base=rope_base, qk_norm=qk_norm,
                         norm_eps=norm_eps, rope_freqs=rope_freqs)
