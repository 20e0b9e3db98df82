"""``mla``: DeepSeek-V2/V3's multi-head latent attention, read into our MultiHeadLatentAttention.

Parts: ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or ``q_proj``), ``kv_a_proj_with_mqa``,
``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``. Read with ``latent_norm=True`` and decoupled RoPE;
DeepSeek's interleaved RoPE pairs are permuted into our rotate-half layout (the same permutation
on queries and keys leaves every logit unchanged), YaRN's attention factor is folded into the RoPE
branch's weights and its mscale is in ``scale``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...layers import Attention, MultiHeadLatentAttention
from .common import (
    bias_or_zeros,
    dropout_p,
    family_function,
    reading_dtype,
    rms_gain,
    rope_base,
    rope_frequencies,
    rotate_half,
)
from .registry import Family, Unsupported, is_linear, register


def _interleave_permutation(width: int) -> torch.Tensor:
    """Rows [0, 2, 4, ..., 1, 3, 5, ...]: interleaved RoPE pairs (x_2j, x_2j+1) -> rotate-half (y_j, y_j+w/2)."""
    return torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)])


def _check_mla_rope(module: nn.Module, rope_dim: int, interleaved: bool) -> None:
    """DeepSeek's RoPE function rotates as we read it (interleaved or rotate-half): probed."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 3, rope_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    angles = torch.rand(1, 3, rope_dim // 2, generator=gen, dtype=torch.float64) * 3
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    perm = _interleave_permutation(rope_dim) if interleaved else torch.arange(rope_dim)
    complex_rope = family_function(module, "apply_rotary_emb")
    try:
        if complex_rope is not None and family_function(module, "apply_rotary_pos_emb") is None:   # DeepSeek-V2
            if not interleaved:
                raise Unsupported("its complex RoPE (apply_rotary_emb) rotates interleaved pairs")
            got_q, got_k = complex_rope(q, k, torch.polar(torch.ones_like(angles), angles))
            got_q, got_k = got_q[..., perm], got_k[..., perm]
        else:
            function = family_function(module, "apply_rotary_pos_emb_interleave" if interleaved
                                        else "apply_rotary_pos_emb")
            if function is None:
                raise Unsupported("its module has no RoPE function to check the layout against")
            got_q, got_k = function(q, k, cos, sin)              # interleaved: output already de-interleaved
    except Unsupported:
        raise
    except Exception as err:
        raise Unsupported(f"its RoPE function failed on a probe ({type(err).__name__}: {err})") from None
    for got, t in ((got_q, q), (got_k, k)):
        want = rotate_half(t[..., perm], cos[:, None], sin[:, None])
        if not torch.allclose(got.to(torch.float64), want, rtol=1e-4, atol=1e-5):
            raise Unsupported("its RoPE is neither rotate-half nor interleaved pairs as the config says")


class MultiHeadLatent(Family):
    name = "mla"
    description = "q_a_proj/q_a_layernorm/q_b_proj or q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj"
    tested_on = ("DeepseekV2Attention", "DeepseekV3Attention")
    linears = ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    parts = frozenset({"q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                      "kv_b_proj", "o_proj"})

    def read(self, module: nn.Module, parent: nn.Module | None) -> tuple[Attention, dict]:
        config = module.config
        d = config.hidden_size
        h = int(getattr(module, "num_heads", config.num_attention_heads))
        nope, rope_dim = int(module.qk_nope_head_dim), int(module.qk_rope_head_dim)
        v_dim, kv_rank = int(module.v_head_dim), int(module.kv_lora_rank)
        q_rank = getattr(module, "q_lora_rank", None)
        if nope != v_dim:
            raise Unsupported(f"qk_nope_head_dim={nope} != v_head_dim={v_dim}: our MultiHeadLatentAttention has one "
                              f"head_dim for query/key and value heads, so it needs them equal")
        low_rank_q = q_rank is not None and getattr(module, "q_a_proj", None) is not None
        q_in = module.q_b_proj if low_rank_q else getattr(module, "q_proj", None)
        if not isinstance(q_in, nn.Linear) or (low_rank_q and not is_linear(module, "q_a_proj")):
            raise Unsupported("it has neither q_a_proj/q_a_layernorm/q_b_proj nor q_proj")
        kv_a, kv_b, out = module.kv_a_proj_with_mqa, module.kv_b_proj, module.o_proj
        shapes_ok = (q_in.out_features == h * (nope + rope_dim) and kv_a.out_features == kv_rank + rope_dim
                     and kv_b.weight.shape == (h * (nope + v_dim), kv_rank) and out.in_features == h * v_dim)
        if not shapes_ok or rope_dim % 2:
            raise Unsupported(f"its projections do not match heads={h}, qk_nope_head_dim={nope}, qk_rope_head_dim="
                              f"{rope_dim} (even), v_head_dim={v_dim}, kv_lora_rank={kv_rank}")
        g_kv, eps = rms_gain(module.kv_a_layernorm, kv_rank, "kv_a_layernorm")
        g_q = None
        if low_rank_q:
            g_q, eps_q = rms_gain(module.q_a_layernorm, int(q_rank), "q_a_layernorm")
            if eps_q != eps:
                raise Unsupported(f"its q_a_layernorm and kv_a_layernorm have different epsilons ({eps_q}, {eps}); "
                                  f"our layer has one")
        interleaved = bool(getattr(config, "rope_interleave", True))
        _check_mla_rope(module, rope_dim, interleaved)
        inv_freq, factor, rope_exact = rope_frequencies(config, rope_dim, attention_factor=True)
        down_bias = kv_a.bias is not None or (low_rank_q and module.q_a_proj.bias is not None)
        layer = MultiHeadLatentAttention(
            d, h, kv_rank, q_rank=int(q_rank) if low_rank_q else None, head_dim=nope, rope="decoupled",
            rope_dim=rope_dim, shared_kv=True, latent_norm=True, norm_eps=eps,
            causal=bool(getattr(module, "is_causal", True)),
            dropout=dropout_p(getattr(module, "attention_dropout", 0.0)),
            bias=out.bias is not None, down_bias=down_bias, scale=float(module.scaling), rope_base=rope_base(config))
        ref = kv_a.weight
        layer = layer.to(device=ref.device, dtype=reading_dtype(ref.dtype)).train(module.training)
        perm = (_interleave_permutation(rope_dim) if interleaved else torch.arange(rope_dim)).to(ref.device)
        with torch.no_grad():
            w64 = lambda t: t.detach().to(torch.float64)                     # noqa: E731
            wq = w64(q_in.weight).view(h, nope + rope_dim, -1)
            layer.q_up.weight.copy_(wq[:, :nope].reshape(h * nope, -1))
            layer.q_rope.weight.copy_((wq[:, nope:][:, perm] * factor).reshape(h * rope_dim, -1))
            wa, ba = w64(kv_a.weight), (w64(kv_a.bias) if kv_a.bias is not None else None)
            layer.kv_down.weight.copy_(wa[:kv_rank])
            layer.k_rope.weight.copy_(wa[kv_rank:][perm] * factor)
            if down_bias:
                ba = ba if ba is not None else torch.zeros(kv_rank + rope_dim, dtype=torch.float64, device=ref.device)
                layer.kv_down.bias.copy_(ba[:kv_rank])
                layer.k_rope.bias.copy_(ba[kv_rank:][perm] * factor)
            wb = w64(kv_b.weight).view(h, nope + v_dim, kv_rank)
            layer.k_up.weight.copy_(wb[:, :nope].reshape(h * nope, kv_rank))
            layer.v_up.weight.copy_(wb[:, nope:].reshape(h * v_dim, kv_rank))
            layer.o_proj.weight.copy_(out.weight)
            if out.bias is not None:
                layer.o_proj.bias.copy_(out.bias)
                layer.q_up.bias.zero_()
            layer.kv_norm.weight.copy_(g_kv)
            if low_rank_q:
                layer.q_down.weight.copy_(module.q_a_proj.weight)
                if down_bias:
                    layer.q_down.bias.copy_(bias_or_zeros(module.q_a_proj.bias, int(q_rank), ref))
                layer.q_norm.weight.copy_(g_q)
        if inv_freq is not None:
            layer.rotary.set_frequencies(inv_freq)
        return layer, {"model_rope": False, "resid_dropout": 0.0, "rope_exact": rope_exact}


register(MultiHeadLatent())
