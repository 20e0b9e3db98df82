"""Transformer pieces shared by the models: the attention spec, norms, MLP and the pre-norm block.

An *attention spec* is a dict ``{"method": "mha"|"gqa"|"mqa"|"mla"|"tucker", **layer_args}``
(a bare method name is accepted): the layer's own constructor arguments, e.g.
``{"method": "tucker", "ranks": (8, 32, 16)}`` or ``{"method": "gqa", "n_kv_heads": 2}``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .._checks import check_choice
from .._fields import check_value, type_hints
from ..accounting import attention_param_count, kv_cache_bytes_per_token
from ..layers import ATTENTION_METHODS, Attention, KVCache, RopeTables, make_attention

NORMS = ("rmsnorm", "layernorm")
# arguments the model decides for every layer; a spec may not set them
MODEL_OWNED = ("d_model", "n_heads", "causal")


def attention_arguments(method, names=()) -> dict[str, object]:
    """{argument: annotation} a spec of ``method`` may set (its constructor's, less the model-owned
    ones; ``Any`` where unannotated). Raises for an unknown method or for unknown ``names``."""
    method = check_choice("attention method", method, sorted(ATTENTION_METHODS))
    cls = ATTENTION_METHODS[method]
    hints = type_hints(cls.__init__)
    allowed = {p.name: hints.get(p.name, Any) for p in inspect.signature(cls).parameters.values()
               if p.name not in MODEL_OWNED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for attention method {method!r}; allowed: {list(allowed)}")
    return allowed


def attention_spec(spec, name: str = "attention") -> dict:
    """Normalize ``spec`` (a method name or a dict with ``method``) and check its keys and the type
    of each value against the layer constructor's annotation (lists become tuples: JSON has no
    tuples). Unknown keys raise, naming the allowed ones; ``name`` prefixes a value's error."""
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, dict) or "method" not in spec:
        raise ValueError(f"{name} must be a method name or a dict with a 'method' key, got {spec!r}")
    arguments = {k: v for k, v in spec.items() if k != "method"}
    annotations = attention_arguments(spec["method"], arguments)
    return {"method": spec["method"],
            **{k: check_value(f"{name}.{k}", v, annotations[k]) for k, v in arguments.items()}}


def check_block_config(config) -> dict | list[dict]:
    """Cross-field checks shared by the model configs (``d_model``/``n_heads``, the MLP width);
    returns the normalized ``config.attention``: one spec for every layer, or a list of
    ``n_layers`` specs, one per layer (what rank-adaptive training ends with)."""
    if config.d_model % config.n_heads:
        raise ValueError(f"model.d_model must be divisible by n_heads, got d_model={config.d_model}, "
                         f"n_heads={config.n_heads}")
    if int(config.mlp_ratio * config.d_model) < 1:
        raise ValueError(f"model.mlp_ratio x model.d_model must give an MLP at least 1 wide, got "
                         f"int({config.mlp_ratio} x {config.d_model}) = 0")
    if isinstance(config.attention, (list, tuple)):
        if len(config.attention) != config.n_layers:
            raise ValueError(f"model.attention as a list needs one spec per layer (n_layers={config.n_layers}), got "
                             f"{len(config.attention)}")
        return [attention_spec(spec, f"model.attention[{i}]") for i, spec in enumerate(config.attention)]
    return attention_spec(config.attention, "model.attention")


def layer_specs(config) -> list[dict]:
    """The attention spec of each of a model config's ``n_layers`` layers."""
    specs = config.attention
    return list(specs) if isinstance(specs, list) else [specs] * config.n_layers


def layer_spec(layer: Attention) -> dict:
    """The attention spec that rebuilds ``layer`` in a model (its config less the model-owned arguments)."""
    return {k: v for k, v in layer.config().items() if k not in MODEL_OWNED}


def build_attention(spec, d_model: int, n_heads: int, *, causal: bool, rope: bool, dropout: float = 0.0,
                    bias: bool = False) -> Attention:
    """The attention layer of ``spec``; ``rope`` switches on each method's ``positional_rope`` unless
    the spec sets it (head-dimension RoPE for MHA/GQA/MQA, latent RoPE for Tucker and MLA)."""
    spec = attention_spec(spec)
    kwargs = {k: v for k, v in spec.items() if k != "method"}
    kwargs.setdefault("rope", ATTENTION_METHODS[spec["method"]].positional_rope if rope else None)
    kwargs.setdefault("dropout", dropout)
    kwargs.setdefault("bias", bias)
    return make_attention(spec["method"], d_model, n_heads, causal=causal, **kwargs)


def make_norm(kind: str, d_model: int) -> nn.Module:
    check_choice("norm", kind, NORMS)
    return nn.RMSNorm(d_model) if kind == "rmsnorm" else nn.LayerNorm(d_model)


class MLP(nn.Module):
    """(B, T, d) -> (B, T, d): Linear(d, ratio·d), GELU, Linear(ratio·d, d), dropout."""

    def __init__(self, d_model: int, mlp_ratio: float, *, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        hidden = int(mlp_ratio * d_model)
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(nn.functional.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, n_heads: int, attention, *, causal: bool, rope: bool, mlp_ratio: float = 4.0,
                 norm: str = "rmsnorm", dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.norm1 = make_norm(norm, d_model)
        self.attn = build_attention(attention, d_model, n_heads, causal=causal, rope=rope, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.norm2 = make_norm(norm, d_model)
        self.mlp = MLP(d_model, mlp_ratio, dropout=dropout, bias=bias)

    def forward(self, x: torch.Tensor, *, cache: KVCache | None = None, attn_mask: torch.Tensor | None = None,
                rope: RopeTables | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.norm1(x), cache=cache, attn_mask=attn_mask, rope=rope))
        return x + self.mlp(self.norm2(x))


def init_non_attention_(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 style init for embeddings and MLPs (attention layers keep their own derived init):
    N(0, std²), the MLP's output projection scaled by 1/sqrt(2·n_layers), biases zero."""
    inside = {id(m) for layer in module.modules() if isinstance(layer, Attention) for m in layer.modules()}
    for name, sub in module.named_modules():
        if id(sub) not in inside and isinstance(sub, (nn.Linear, nn.Embedding)):
            scale = (2 * n_layers) ** -0.5 if name.endswith("mlp.proj") else 1.0
            nn.init.normal_(sub.weight, std=std * scale)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)


class ModelStats:
    """Mixin: parameter and KV-cache accounting plus the one-line summary of a model with ``blocks``."""

    blocks: nn.ModuleList

    def attention_layers(self) -> list[Attention]:
        return [block.attn for block in self.blocks]

    @property
    def n_params(self) -> int:
        """Unique trainable scalars (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def attention_params(self) -> int:
        return sum(attention_param_count(layer) for layer in self.attention_layers())

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """KV-cache bytes one token costs over all layers (in ``dtype``, default the weights' dtype)."""
        dtype = dtype or next(self.parameters()).dtype
        return sum(kv_cache_bytes_per_token(layer, dtype) for layer in self.attention_layers())

    def summary(self) -> str:
        dtype = next(self.parameters()).dtype
        methods = sorted({layer.method for layer in self.attention_layers()})
        return (f"{type(self).__name__} ({'/'.join(methods)}): {self.n_params / 1e6:.3f}M params, attention "
                f"{self.attention_params / 1e6:.3f}M ({100 * self.attention_params / self.n_params:.1f}%), "
                f"KV cache {self.kv_bytes_per_token()} B/token ({str(dtype).removeprefix('torch.')})")
