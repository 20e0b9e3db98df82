"""The readers behind :func:`~.read.read_block`: one block's weights and facts into our layer.

Per structure, ``_read_gqa`` (bert, gpt2, proj, qkv_proj, neox) and ``_read_mla`` (DeepSeek)
copy the projections into a :class:`~tucker_attention.layers.GroupedQueryAttention` /
:class:`~tucker_attention.layers.MultiHeadLatentAttention`, with the small readers they use:
the RoPE parameters and frequencies of a config, probes of the family's RoPE functions and of
per-head / latent RMSNorms, sliding windows, soft-caps and biases.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from ...layers import GroupedQueryAttention, MultiHeadAttention, MultiHeadLatentAttention


class _Unsupported(Exception):
    """A module that matches a structure in its names but not in what it computes."""


# -- small readers -------------------------------------------------------------------------------

def _dropout_p(value) -> float:
    return float(value.p if isinstance(value, nn.Dropout) else value or 0.0)


def reading_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a block's layer is read in: its own, at least float32 (the conversion math and the
    measurements of a bf16 / fp16 model run in float32; its weights are exact there)."""
    return torch.promote_types(dtype, torch.float32)


def _linear(module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Linear)


def _rope_params(config, layer_type: str | None) -> tuple[dict, str | None]:
    """(the RoPE parameters of a block, the layer type to pass to transformers' RoPE functions)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):   # per layer type (Gemma 3)
        return params[layer_type], layer_type
    return params, None


def _rope_base(config, layer_type: str | None = None) -> float:
    params, _ = _rope_params(config, layer_type)
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _partial_rotary_factor(config, layer_type: str | None) -> float:
    params, _ = _rope_params(config, layer_type)
    return float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))


def _rope_frequencies(config, rope_dim: int, layer_type: str | None = None, *, attention_factor: bool = False):
    """(inverse frequencies (rope_dim/2,) or None, attention factor, whether a fixed table reproduces them).

    The default type: transformers' formula from ``rope_theta``, rounded to float32 as the model's
    own buffer is (so a float32 model's tables match bit for bit). Static types (linear,
    llama3, YaRN, LongRoPE at its short factor...) give their frequencies. An attention factor
    != 1 (YaRN, LongRoPE) scales cos and sin: it is returned when ``attention_factor`` (the
    caller folds it into weights), otherwise the table is marked inexact. Dynamic NTK: inexact.
    """
    params, kind = _rope_params(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":                          # transformers' own formula, in float32 as its buffer
        base = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        return 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float) / rope_dim)), 1.0, True
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        return None, 1.0, False
    try:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, None, **({"layer_type": kind} if kind else {}))
    except Exception:                                   # a type this config cannot evaluate statically
        return None, 1.0, False
    factor = float(factor)
    if inv_freq.numel() != rope_dim // 2 or (factor != 1.0 and not attention_factor):
        return None, 1.0, False
    return inv_freq, factor, True


def _rms_gain(norm: nn.Module, width: int, label: str) -> tuple[torch.Tensor, float]:
    """(the effective gain (width,) float64, eps) of an RMSNorm over ``width`` dims.

    Families write the gain as w (Llama, Qwen3) or 1 + w (Gemma): the norm is probed on a few
    numbers to tell which, and anything that is not x / sqrt(mean(x^2) + eps) * gain (a
    LayerNorm, a norm over more dims) is refused.
    """
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    eps = getattr(norm, "eps", None) if eps is None else eps
    if isinstance(norm, nn.RMSNorm) and eps is None and isinstance(weight, torch.Tensor):
        eps = torch.finfo(weight.dtype).eps
    if (not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,) or eps is None
            or getattr(norm, "bias", None) is not None):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise _Unsupported(f"{label} is {type(norm).__name__} with weight shape {shape}; only an RMSNorm over "
                           f"each head's (or latent's) {width} dims is read (e.g. not OLMo2's norm over the whole "
                           f"projection, nor a LayerNorm)")
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out = norm(x).to(torch.float64)
    x64 = x.to(torch.float64)
    unit = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + float(eps))
    w = weight.detach().to(torch.float64)
    errors = {}
    for kind, gain in (("w", w), ("1+w", 1.0 + w)):
        want = unit * gain
        errors[kind] = float((out - want).norm() / want.norm().clamp_min(1e-30))
    kind = min(errors, key=errors.get)
    if not errors[kind] < 2e-2:
        raise _Unsupported(f"{label} ({type(norm).__name__}) does not compute x / rms(x) * w nor x / rms(x) * (1 + w)")
    return (w if kind == "w" else 1.0 + w), float(eps)


def _family_function(module: nn.Module, name: str):
    return getattr(sys.modules.get(type(module).__module__), name, None)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _check_head_rope(module: nn.Module, head_dim: int, rope_dim: int) -> None:
    """The family's ``apply_rotary_pos_emb`` rotates the first rope_dim dims of each head by
    rotate-half (as our layers do): probed on random q, k and tables."""
    function = _family_function(module, "apply_rotary_pos_emb")
    if function is None:
        raise _Unsupported("it takes position_embeddings but its module has no apply_rotary_pos_emb, so its "
                           "RoPE layout cannot be checked")
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 3, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    cos, sin = (torch.randn(1, 3, rope_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    try:
        got_q, got_k = function(q, k, cos, sin)
    except Exception as err:
        raise _Unsupported(f"its apply_rotary_pos_emb cannot rotate {rope_dim} of {head_dim} dims per head "
                           f"({type(err).__name__}: {err})") from None
    for got, t in ((got_q, q), (got_k, k)):
        want = torch.cat([_rotate_half(t[..., :rope_dim], cos[:, None], sin[:, None]), t[..., rope_dim:]], dim=-1)
        if got.shape != want.shape or not torch.allclose(got.to(torch.float64), want, rtol=1e-4, atol=1e-5):
            raise _Unsupported("its apply_rotary_pos_emb is not rotate-half RoPE on the first "
                               f"{rope_dim} dims of each head (e.g. interleaved pairs, as Cohere's)")


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
    complex_rope = _family_function(module, "apply_rotary_emb")
    try:
        if complex_rope is not None and _family_function(module, "apply_rotary_pos_emb") is None:   # DeepSeek-V2
            if not interleaved:
                raise _Unsupported("its complex RoPE (apply_rotary_emb) rotates interleaved pairs")
            got_q, got_k = complex_rope(q, k, torch.polar(torch.ones_like(angles), angles))
            got_q, got_k = got_q[..., perm], got_k[..., perm]
        else:
            function = _family_function(module, "apply_rotary_pos_emb_interleave" if interleaved
                                        else "apply_rotary_pos_emb")
            if function is None:
                raise _Unsupported("its module has no RoPE function to check the layout against")
            got_q, got_k = function(q, k, cos, sin)              # interleaved: output already de-interleaved
    except _Unsupported:
        raise
    except Exception as err:
        raise _Unsupported(f"its RoPE function failed on a probe ({type(err).__name__}: {err})") from None
    for got, t in ((got_q, q), (got_k, k)):
        want = _rotate_half(t[..., perm], cos[:, None], sin[:, None])
        if not torch.allclose(got.to(torch.float64), want, rtol=1e-4, atol=1e-5):
            raise _Unsupported("its RoPE is neither rotate-half nor interleaved pairs as the config says")


def _uses_model_rope(module: nn.Module) -> bool:
    """The block rotates queries and keys by the model's ``position_embeddings``."""
    try:
        takes = "position_embeddings" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return takes and bool(getattr(module, "use_rope", True))                 # SmolLM3's NoPE layers


def _sliding_window(module: nn.Module, config) -> int | None:
    window = getattr(module, "sliding_window", None) if hasattr(module, "sliding_window") else getattr(
        config, "sliding_window", None)
    return int(window) if window else None


def _softcap(module: nn.Module) -> float | None:
    cap = getattr(module, "attn_logit_softcapping", None)
    return float(cap) if cap else None


def _bias(linear_bias: torch.Tensor | None, width: int, like: torch.Tensor) -> torch.Tensor:
    return linear_bias.detach() if linear_bias is not None else torch.zeros(width, dtype=like.dtype, device=like.device)


def _split_bias(bias: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if bias is None else list(bias.detach().split(sizes))


# -- the readers: weights and facts of one structure -------------------------------------------------

def _head_dim(module, config, q_width: int) -> int:
    head_dim = getattr(module, "head_dim", None) or getattr(module, "head_size", None)
    if not isinstance(head_dim, int):
        head_dim = getattr(config, "head_dim", None) or q_width // config.num_attention_heads
    return int(head_dim)


def _gqa_parts(module: nn.Module, structure: str, parent: nn.Module | None):
    """(q, k, v, o) as (weight (out, in), bias or None), head_dim, n_heads, attention dropout, resid dropout."""
    config = module.config
    d = config.hidden_size
    resid_dropout = 0.0
    if structure == "bert":
        out = getattr(getattr(parent, "output", None), "dense", None)
        if not isinstance(out, nn.Linear):
            raise _Unsupported(f"it needs its parent's output.dense (nn.Linear) as output projection; the parent "
                               f"{type(parent).__name__} has none")
        weights = [(m.weight.detach(), m.bias) for m in (module.query, module.key, module.value, out)]
        head_dim = int(getattr(module, "attention_head_size", 0)
                       or _head_dim(module, config, module.query.out_features))
        dropout = _dropout_p(getattr(module, "dropout", 0.0))
    elif structure == "gpt2":
        w, b = module.c_attn.weight.detach().T, module.c_attn.bias        # Conv1D: y = x W + b, W (d, 3d)
        if w.shape[0] != 3 * d:
            raise _Unsupported(f"its c_attn maps {w.shape[1]} -> {w.shape[0]}, not d -> 3d (cross-attention?)")
        (wq, wk, wv), (bq, bk, bv) = w.split(d, dim=0), _split_bias(b, [d] * 3)
        weights = [(wq, bq), (wk, bk), (wv, bv), (module.c_proj.weight.detach().T, module.c_proj.bias)]
        head_dim = int(module.head_dim)
        dropout, resid_dropout = _dropout_p(module.attn_dropout), _dropout_p(getattr(module, "resid_dropout", 0.0))
    elif structure == "proj":
        weights = [(m.weight.detach(), m.bias) for m in (module.q_proj, module.k_proj, module.v_proj, module.o_proj)]
        head_dim = _head_dim(module, config, module.q_proj.out_features)
        dropout = _dropout_p(getattr(module, "attention_dropout", 0.0))
    elif structure == "qkv_proj":
        head_dim = _head_dim(module, config, module.o_proj.in_features)
        q_width = module.o_proj.in_features
        kv_width = (module.qkv_proj.out_features - q_width) // 2
        sizes = [q_width, kv_width, kv_width]
        ws, bs = module.qkv_proj.weight.detach().split(sizes), _split_bias(module.qkv_proj.bias, sizes)
        weights = list(zip(ws, bs)) + [(module.o_proj.weight.detach(), module.o_proj.bias)]
        dropout = _dropout_p(getattr(module, "attention_dropout", 0.0))
    else:                                                                 # neox: per head [q, k, v]
        head_dim = _head_dim(module, config, module.dense.in_features)
        heads = module.query_key_value.out_features // (3 * head_dim)
        w = module.query_key_value.weight.detach().view(heads, 3, head_dim, -1)
        b = module.query_key_value.bias
        b = b.detach().view(heads, 3, head_dim) if b is not None else None
        weights = [(w[:, i].reshape(heads * head_dim, -1), None if b is None else b[:, i].reshape(-1))
                   for i in range(3)] + [(module.dense.weight.detach(), module.dense.bias)]
        dropout = _dropout_p(getattr(module, "attention_dropout", 0.0))
    (wq, _), (wk, _), (wv, _), (wo, _) = weights
    if wq.shape[0] % head_dim or wk.shape[0] % head_dim or wk.shape != wv.shape or wo.shape[1] != wq.shape[0] \
            or {wq.shape[1], wk.shape[1], wo.shape[0]} != {d}:
        raise _Unsupported(f"its projections do not form attention heads of width {head_dim}: q {tuple(wq.shape)}, "
                           f"k {tuple(wk.shape)}, v {tuple(wv.shape)}, o {tuple(wo.shape)} (d_model {d})")
    n_heads, n_kv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    expected = getattr(config, "num_attention_heads", n_heads)
    if n_heads != expected or n_heads % n_kv:
        raise _Unsupported(f"its query projection gives {n_heads} heads of width {head_dim}, the config says "
                           f"{expected} (with {n_kv} key heads); e.g. a gated query projection")
    return weights, head_dim, n_heads, n_kv, dropout, resid_dropout


def _read_gqa(module: nn.Module, structure: str, parent: nn.Module | None):
    config = module.config
    d = config.hidden_size
    weights, head_dim, n_heads, n_kv, dropout, resid_dropout = _gqa_parts(module, structure, parent)
    layer_type = getattr(module, "layer_type", None)
    rope = structure in ("proj", "qkv_proj", "neox") and _uses_model_rope(module)
    rope_dim = None
    if rope:
        rope_dim = getattr(module, "rotary_ndims", None) if structure == "neox" else None
        rope_dim = int(rope_dim if rope_dim is not None else head_dim * _partial_rotary_factor(config, layer_type))
        if rope_dim % 2 or not 0 < rope_dim <= head_dim:
            raise _Unsupported(f"its RoPE width {rope_dim} is not an even number in (0, head_dim={head_dim}]")
        _check_head_rope(module, head_dim, rope_dim)
    gains, norm_eps = [], 1e-6
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    if structure == "proj" and (q_norm is not None or k_norm is not None):
        if q_norm is None or k_norm is None:
            raise _Unsupported("it has a norm on only one of queries and keys")
        (g_q, eps_q), (g_k, eps_k) = _rms_gain(q_norm, head_dim, "q_norm"), _rms_gain(k_norm, head_dim, "k_norm")
        if eps_q != eps_k:
            raise _Unsupported(f"its q_norm and k_norm have different epsilons ({eps_q}, {eps_k}); our layer has one")
        gains, norm_eps = [g_q, g_k], eps_q
    has_bias = any(b is not None for _, b in weights)
    ref = weights[0][0]
    scale = float(getattr(module, "scaling", None) or head_dim ** -0.5)
    options = {"head_dim": head_dim, "causal": bool(getattr(module, "is_causal", False)), "rope": rope,
               "rope_dim": rope_dim if rope_dim != head_dim else None, "dropout": dropout, "bias": has_bias,
               "scale": scale, "rope_base": _rope_base(config, layer_type) if rope else 10000.0,
               "qk_norm": bool(gains), "norm_eps": norm_eps}
    layer = (MultiHeadAttention(d, n_heads, **options) if n_kv == n_heads
             else GroupedQueryAttention(d, n_heads, n_kv, **options))
    layer = layer.to(device=ref.device, dtype=reading_dtype(ref.dtype)).train(module.training)
    with torch.no_grad():
        for proj, (weight, bias) in zip((layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj), weights):
            proj.weight.copy_(weight)
            if has_bias:
                proj.bias.copy_(_bias(bias, proj.out_features, ref))
        if gains:
            layer.q_norm.weight.copy_(gains[0])
            layer.k_norm.weight.copy_(gains[1])
    rope_exact = True
    if rope:
        inv_freq, _, rope_exact = _rope_frequencies(config, rope_dim, layer_type)
        if inv_freq is not None:
            layer.rotary.set_frequencies(inv_freq)
    return layer, {"model_rope": rope, "resid_dropout": resid_dropout, "rope_exact": rope_exact}


def _read_mla(module: nn.Module):
    config = module.config
    d = config.hidden_size
    h = int(getattr(module, "num_heads", config.num_attention_heads))
    nope, rope_dim = int(module.qk_nope_head_dim), int(module.qk_rope_head_dim)
    v_dim, kv_rank = int(module.v_head_dim), int(module.kv_lora_rank)
    q_rank = getattr(module, "q_lora_rank", None)
    if nope != v_dim:
        raise _Unsupported(f"qk_nope_head_dim={nope} != v_head_dim={v_dim}: our MultiHeadLatentAttention has one "
                           f"head_dim for query/key and value heads, so it needs them equal")
    low_rank_q = q_rank is not None and getattr(module, "q_a_proj", None) is not None
    q_in = module.q_b_proj if low_rank_q else getattr(module, "q_proj", None)
    if not isinstance(q_in, nn.Linear) or (low_rank_q and not _linear(module, "q_a_proj")):
        raise _Unsupported("it has neither q_a_proj/q_a_layernorm/q_b_proj nor q_proj")
    kv_a, kv_b, out = module.kv_a_proj_with_mqa, module.kv_b_proj, module.o_proj
    shapes_ok = (q_in.out_features == h * (nope + rope_dim) and kv_a.out_features == kv_rank + rope_dim
                 and kv_b.weight.shape == (h * (nope + v_dim), kv_rank) and out.in_features == h * v_dim)
    if not shapes_ok or rope_dim % 2:
        raise _Unsupported(f"its projections do not match heads={h}, qk_nope_head_dim={nope}, qk_rope_head_dim="
                           f"{rope_dim} (even), v_head_dim={v_dim}, kv_lora_rank={kv_rank}")
    g_kv, eps = _rms_gain(module.kv_a_layernorm, kv_rank, "kv_a_layernorm")
    g_q = None
    if low_rank_q:
        g_q, eps_q = _rms_gain(module.q_a_layernorm, int(q_rank), "q_a_layernorm")
        if eps_q != eps:
            raise _Unsupported(f"its q_a_layernorm and kv_a_layernorm have different epsilons ({eps_q}, {eps}); "
                               f"our layer has one")
    interleaved = bool(getattr(config, "rope_interleave", True))
    _check_mla_rope(module, rope_dim, interleaved)
    inv_freq, factor, rope_exact = _rope_frequencies(config, rope_dim, attention_factor=True)
    down_bias = kv_a.bias is not None or (low_rank_q and module.q_a_proj.bias is not None)
    layer = MultiHeadLatentAttention(
        d, h, kv_rank, q_rank=int(q_rank) if low_rank_q else None, head_dim=nope, rope="decoupled",
        rope_dim=rope_dim, shared_kv=True, latent_norm=True, norm_eps=eps,
        causal=bool(getattr(module, "is_causal", True)), dropout=_dropout_p(getattr(module, "attention_dropout", 0.0)),
        bias=out.bias is not None, down_bias=down_bias, scale=float(module.scaling), rope_base=_rope_base(config))
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
                layer.q_down.bias.copy_(_bias(module.q_a_proj.bias, int(q_rank), ref))
            layer.q_norm.weight.copy_(g_q)
    if inv_freq is not None:
        layer.rotary.set_frequencies(inv_freq)
    return layer, {"model_rope": False, "resid_dropout": 0.0, "rope_exact": rope_exact}
