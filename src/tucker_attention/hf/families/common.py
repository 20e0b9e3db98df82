"""What the families share: reading a block's weights, RoPE and norms into our layers.

:class:`GQAFamily` is a family read into a :class:`~tucker_attention.layers.GroupedQueryAttention`
(:class:`~tucker_attention.layers.MultiHeadAttention` when it has as many key heads as query heads):
it only says where the four projections are (:class:`Projections`) and :func:`read_gqa` does the
rest (head checks, head RoPE, per-head q/k norms, biases). The small readers here serve every
family: the RoPE parameters and frequencies of a config, probes of a family's RoPE function and
of RMSNorms, sliding windows, soft-caps and biases.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ...layers import Attention, GroupedQueryAttention, MultiHeadAttention
from .registry import Family, Unsupported

# -- small readers -------------------------------------------------------------------------------

def dropout_p(value) -> float:
    return float(value.p if isinstance(value, nn.Dropout) else value or 0.0)


def reading_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a block's layer is read in: its own, at least float32 (the conversion math and the
    measurements of a bf16 / fp16 model run in float32; its weights are exact there)."""
    return torch.promote_types(dtype, torch.float32)


def _rope_params(config, layer_type: str | None) -> tuple[dict, str | None]:
    """(the RoPE parameters of a block, the layer type to pass to transformers' RoPE functions)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):   # per layer type (Gemma 3)
        return params[layer_type], layer_type
    return params, None


def rope_base(config, layer_type: str | None = None) -> float:
    params, _ = _rope_params(config, layer_type)
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _partial_rotary_factor(config, layer_type: str | None) -> float:
    params, _ = _rope_params(config, layer_type)
    return float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))


def rope_frequencies(config, rope_dim: int, layer_type: str | None = None, *, attention_factor: bool = False):
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


def rms_gain(norm: nn.Module, width: int, label: str) -> tuple[torch.Tensor, float]:
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
        raise Unsupported(f"{label} is {type(norm).__name__} with weight shape {shape}; only an RMSNorm over "
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
        raise Unsupported(f"{label} ({type(norm).__name__}) does not compute x / rms(x) * w nor x / rms(x) * (1 + w)")
    return (w if kind == "w" else 1.0 + w), float(eps)


def family_function(module: nn.Module, name: str):
    return getattr(sys.modules.get(type(module).__module__), name, None)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _check_head_rope(module: nn.Module, head_dim: int, rope_dim: int) -> None:
    """The family's ``apply_rotary_pos_emb`` rotates the first rope_dim dims of each head by
    rotate-half (as our layers do): probed on random q, k and tables."""
    function = family_function(module, "apply_rotary_pos_emb")
    if function is None:
        raise Unsupported("it takes position_embeddings but its module has no apply_rotary_pos_emb, so its "
                          "RoPE layout cannot be checked")
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 3, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    cos, sin = (torch.randn(1, 3, rope_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    try:
        got_q, got_k = function(q, k, cos, sin)
    except Exception as err:
        raise Unsupported(f"its apply_rotary_pos_emb cannot rotate {rope_dim} of {head_dim} dims per head "
                          f"({type(err).__name__}: {err})") from None
    for got, t in ((got_q, q), (got_k, k)):
        want = torch.cat([rotate_half(t[..., :rope_dim], cos[:, None], sin[:, None]), t[..., rope_dim:]], dim=-1)
        if got.shape != want.shape or not torch.allclose(got.to(torch.float64), want, rtol=1e-4, atol=1e-5):
            raise Unsupported("its apply_rotary_pos_emb is not rotate-half RoPE on the first "
                              f"{rope_dim} dims of each head (e.g. interleaved pairs, as Cohere's)")


def _uses_model_rope(module: nn.Module) -> bool:
    """The block rotates queries and keys by the model's ``position_embeddings``."""
    try:
        takes = "position_embeddings" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return takes and bool(getattr(module, "use_rope", True))                 # SmolLM3's NoPE layers


def sliding_window(module: nn.Module, config) -> int | None:
    window = getattr(module, "sliding_window", None) if hasattr(module, "sliding_window") else getattr(
        config, "sliding_window", None)
    return int(window) if window else None


def softcap(module: nn.Module) -> float | None:
    cap = getattr(module, "attn_logit_softcapping", None)
    return float(cap) if cap else None


def bias_or_zeros(linear_bias: torch.Tensor | None, width: int, like: torch.Tensor) -> torch.Tensor:
    return linear_bias.detach() if linear_bias is not None else torch.zeros(width, dtype=like.dtype, device=like.device)


def split_bias(bias: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if bias is None else list(bias.detach().split(sizes))




def weight_and_bias(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias or None) of an ``nn.Linear``, as :class:`Projections` holds them."""
    return linear.weight.detach(), linear.bias


def head_dim_of(module: nn.Module, config, q_width: int) -> int:
    """A block's head width: its ``head_dim`` / ``head_size``, else the config's, else q_width / heads."""
    head_dim = getattr(module, "head_dim", None) or getattr(module, "head_size", None)
    if not isinstance(head_dim, int):
        head_dim = getattr(config, "head_dim", None) or q_width // config.num_attention_heads
    return int(head_dim)


# -- the grouped-query reading path -----------------------------------------------------------------

@dataclass
class Projections:
    """What a :class:`GQAFamily` finds in a block.

    weights: q, k, v, o as (weight (out, in), bias or None), heads concatenated. head_dim: the
    width of a head. dropout: on the attention weights; resid_dropout: after the output projection
    (GPT-2). rope_dim: the rotated width when the block says it (GPT-NeoX's ``rotary_ndims``; None:
    head_dim x the config's partial_rotary_factor). norms: per-head RMSNorms of queries and keys
    before RoPE (Qwen3, Gemma 3) or None.
    """
    weights: list[tuple[torch.Tensor, torch.Tensor | None]]
    head_dim: int
    dropout: float = 0.0
    resid_dropout: float = 0.0
    rope_dim: int | None = None
    norms: tuple[nn.Module | None, nn.Module | None] = (None, None)


class GQAFamily(Family):
    """A family read into grouped-query (or multi-head) attention: :meth:`projections` says where its
    weights are, :func:`read_gqa` reads them."""

    #: Whether its blocks may rotate queries and keys by the model's ``position_embeddings`` (head
    #: RoPE, checked against the family's ``apply_rotary_pos_emb``).
    head_rope: bool = False

    def projections(self, module: nn.Module, parent: nn.Module | None) -> Projections:
        """The block's q, k, v, o weights and head facts (raise :class:`Unsupported` when they are not there)."""
        raise NotImplementedError

    def read(self, module: nn.Module, parent: nn.Module | None) -> tuple[Attention, dict]:
        return read_gqa(module, self.projections(module, parent), head_rope=self.head_rope)


def _heads(weights, head_dim: int, config) -> tuple[int, int]:
    """(query heads, key heads) of the projections, checked against d_model and the config."""
    d = config.hidden_size
    (wq, _), (wk, _), (wv, _), (wo, _) = weights
    if wq.shape[0] % head_dim or wk.shape[0] % head_dim or wk.shape != wv.shape or wo.shape[1] != wq.shape[0] \
            or {wq.shape[1], wk.shape[1], wo.shape[0]} != {d}:
        raise Unsupported(f"its projections do not form attention heads of width {head_dim}: q {tuple(wq.shape)}, "
                          f"k {tuple(wk.shape)}, v {tuple(wv.shape)}, o {tuple(wo.shape)} (d_model {d})")
    n_heads, n_kv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    expected = getattr(config, "num_attention_heads", n_heads)
    if n_heads != expected or n_heads % n_kv:
        raise Unsupported(f"its query projection gives {n_heads} heads of width {head_dim}, the config says "
                          f"{expected} (with {n_kv} key heads); e.g. a gated query projection")
    return n_heads, n_kv


def _qk_norms(norms, head_dim: int) -> tuple[list[torch.Tensor], float]:
    """([q gain, k gain] or [], eps) of a block's per-head q/k RMSNorms."""
    q_norm, k_norm = norms
    if q_norm is None and k_norm is None:
        return [], 1e-6
    if q_norm is None or k_norm is None:
        raise Unsupported("it has a norm on only one of queries and keys")
    (g_q, eps_q), (g_k, eps_k) = rms_gain(q_norm, head_dim, "q_norm"), rms_gain(k_norm, head_dim, "k_norm")
    if eps_q != eps_k:
        raise Unsupported(f"its q_norm and k_norm have different epsilons ({eps_q}, {eps_k}); our layer has one")
    return [g_q, g_k], eps_q


def read_gqa(module: nn.Module, parts: Projections, *, head_rope: bool) -> tuple[Attention, dict]:
    """A block's :class:`Projections` -> (our grouped-query layer, {'model_rope', 'resid_dropout', 'rope_exact'}).

    head_rope: the family may rotate by the model's ``position_embeddings``; a block does when its
    forward takes them (and it is not a NoPE layer, SmolLM3's ``use_rope``).
    """
    config, weights, head_dim = module.config, parts.weights, parts.head_dim
    n_heads, n_kv = _heads(weights, head_dim, config)
    layer_type = getattr(module, "layer_type", None)
    rope = head_rope and _uses_model_rope(module)
    rope_dim = None
    if rope:
        rope_dim = parts.rope_dim
        rope_dim = int(rope_dim if rope_dim is not None else head_dim * _partial_rotary_factor(config, layer_type))
        if rope_dim % 2 or not 0 < rope_dim <= head_dim:
            raise Unsupported(f"its RoPE width {rope_dim} is not an even number in (0, head_dim={head_dim}]")
        _check_head_rope(module, head_dim, rope_dim)
    gains, norm_eps = _qk_norms(parts.norms, head_dim)
    has_bias = any(b is not None for _, b in weights)
    ref = weights[0][0]
    scale = float(getattr(module, "scaling", None) or head_dim ** -0.5)
    options = {"head_dim": head_dim, "causal": bool(getattr(module, "is_causal", False)), "rope": rope,
               "rope_dim": rope_dim if rope_dim != head_dim else None, "dropout": parts.dropout, "bias": has_bias,
               "scale": scale, "rope_base": rope_base(config, layer_type) if rope else 10000.0,
               "qk_norm": bool(gains), "norm_eps": norm_eps}
    d = config.hidden_size
    layer = (MultiHeadAttention(d, n_heads, **options) if n_kv == n_heads
             else GroupedQueryAttention(d, n_heads, n_kv, **options))
    layer = layer.to(device=ref.device, dtype=reading_dtype(ref.dtype)).train(module.training)
    with torch.no_grad():
        for proj, (weight, bias) in zip((layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj), weights):
            proj.weight.copy_(weight)
            if has_bias:
                proj.bias.copy_(bias_or_zeros(bias, proj.out_features, ref))
        if gains:
            layer.q_norm.weight.copy_(gains[0])
            layer.k_norm.weight.copy_(gains[1])
    rope_exact = True
    if rope:
        inv_freq, _, rope_exact = rope_frequencies(config, rope_dim, layer_type)
        if inv_freq is not None:
            layer.rotary.set_frequencies(inv_freq)
    return layer, {"model_rope": rope, "resid_dropout": parts.resid_dropout, "rope_exact": rope_exact}
