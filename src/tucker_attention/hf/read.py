"""Reading Hugging Face attention blocks into our layers.

A supported block is one self-attention sub-module of a ``transformers`` (>= 5) model:

- ``BertSelfAttention`` (also RoBERTa, XLM-R): ``query``/``key``/``value`` with biases; the
  output projection is the parent's ``output.dense``.
- ``GPT2Attention``: fused ``c_attn`` (Conv1D, d -> 3d) with bias; ``c_proj`` inside the block.
- ``LlamaAttention``: ``q_proj``/``k_proj``/``v_proj``/``o_proj``, GQA, head-dimension RoPE.
- ``ViTAttention``: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with biases (transformers 5
  merged ViTSelfAttention and ViTSelfOutput into it).

:func:`read_block` turns one into a :class:`GroupedQueryAttention` (MHA when it has as many
key heads as query heads) whose output is the block's output before the residual, bit for
bit up to float rounding. :class:`~.blocks.HFAttention` is the module that replaces the block
inside the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import Attention, GroupedQueryAttention, MultiHeadAttention

BERT_STYLE = ("BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention")
PROJ_STYLE = ("LlamaAttention", "ViTAttention")
SUPPORTED_BLOCKS = BERT_STYLE + ("GPT2Attention",) + PROJ_STYLE


@dataclass
class Block:
    """One supported attention block of a model.

    path: its module path (e.g. ``encoder.layer.0.attention.self``). kind: 'bert' | 'gpt2' | 'proj'.
    layer: our layer holding a copy of its weights. layer_idx: its index in the model's cache.
    model_rope: the block takes RoPE tables (``position_embeddings``) from the model.
    resid_dropout: dropout the block applies after its output projection (GPT-2).
    rope_exact: our layer's own RoPE reproduces the model's (False for dynamic / YaRN-type
    scaling; converted blocks use the model's tables and stay exact for head-dimension RoPE).
    sliding_window: the block's window (keys within it; the model's mask already applies it,
    the kernel gets it as ``sliding_window=``) or None. softcap: the block's logit soft-cap
    (Gemma 2; passed to the kernel as ``softcap=``) or None.
    """
    path: str
    kind: str
    layer: Attention
    layer_idx: int | None
    model_rope: bool
    resid_dropout: float
    rope_exact: bool = True
    sliding_window: int | None = None
    softcap: float | None = None


def _kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name in BERT_STYLE and all(hasattr(module, a) for a in ("query", "key", "value")):
        return "bert"
    if name == "GPT2Attention" and not getattr(module, "is_cross_attention", False):
        return "gpt2"
    if name in PROJ_STYLE and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "proj"
    return None


def _dropout_p(value) -> float:
    return float(value.p if isinstance(value, nn.Dropout) else value or 0.0)


def _rope_base(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rope_frequencies(config, head_dim: int) -> tuple[torch.Tensor | None, bool]:
    """(the model's RoPE inverse frequencies (head_dim/2,) or None, whether a fixed table reproduces them).

    None with True: the default type, our tables from ``rope_theta`` match. Static types
    (linear, llama3) give their frequencies. Dynamic NTK, YaRN / LongRoPE attention factors
    and partial RoPE give (None, False).
    """
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default" and getattr(config, "partial_rotary_factor", 1.0) == 1.0:
        return None, True
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        return None, False
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    if attention_factor != 1.0 or inv_freq.numel() != head_dim // 2:
        return None, False
    return inv_freq, True


def _bias(linear_bias: torch.Tensor | None, width: int, like: torch.Tensor) -> torch.Tensor:
    return linear_bias.detach() if linear_bias is not None else torch.zeros(width, dtype=like.dtype, device=like.device)


def read_block(module: nn.Module, parent: nn.Module | None = None) -> tuple[GroupedQueryAttention, dict]:
    """One supported block -> (our layer with its weights, facts the drop-in needs).

    ``parent`` is the BERT-style block's parent (holding ``output.dense``).
    """
    kind = _kind(module)
    if kind is None:
        raise TypeError(f"unsupported attention block {type(module).__name__}; "
                        f"supported: {', '.join(SUPPORTED_BLOCKS)}")
    config = module.config
    d = config.hidden_size
    causal = bool(getattr(module, "is_causal", False))
    rope = kind == "proj" and type(module).__name__ == "LlamaAttention"
    resid_dropout = 0.0
    if kind == "bert":
        out = getattr(getattr(parent, "output", None), "dense", None)
        if not isinstance(out, nn.Linear):
            raise TypeError(f"{type(module).__name__} needs its parent's output.dense (nn.Linear) as output "
                            f"projection; the parent {type(parent).__name__} has none")
        q, k, v = module.query, module.key, module.value
        weights = [(m.weight.detach(), m.bias) for m in (q, k, v, out)]
        n_heads, head_dim = module.num_attention_heads, module.attention_head_size
        dropout = _dropout_p(module.dropout)
    elif kind == "gpt2":
        w, b = module.c_attn.weight.detach().T, module.c_attn.bias        # Conv1D: y = x W + b, W (d, 3d)
        (wq, wk, wv), (bq, bk, bv) = w.split(d, dim=0), b.detach().split(d)
        weights = [(wq, bq), (wk, bk), (wv, bv), (module.c_proj.weight.detach().T, module.c_proj.bias)]
        n_heads, head_dim = module.num_heads, module.head_dim
        dropout, resid_dropout = _dropout_p(module.attn_dropout), _dropout_p(module.resid_dropout)
    else:
        weights = [(m.weight.detach(), m.bias) for m in (module.q_proj, module.k_proj, module.v_proj, module.o_proj)]
        head_dim = module.head_dim
        n_heads = module.q_proj.out_features // head_dim
        dropout = _dropout_p(getattr(module, "attention_dropout", 0.0))
    n_kv_heads = weights[1][0].shape[0] // head_dim
    has_bias = any(b is not None for _, b in weights)
    scale = float(getattr(module, "scaling", head_dim ** -0.5))
    ref = weights[0][0]
    options = {"head_dim": head_dim, "causal": causal, "rope": rope, "dropout": dropout, "bias": has_bias,
               "scale": scale, "rope_base": _rope_base(config) if rope else 10000.0}
    layer = (MultiHeadAttention(d, n_heads, **options) if n_kv_heads == n_heads
             else GroupedQueryAttention(d, n_heads, n_kv_heads, **options))
    layer = layer.to(device=ref.device, dtype=ref.dtype).train(module.training)
    with torch.no_grad():
        for proj, (weight, bias) in zip((layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj), weights):
            proj.weight.copy_(weight)
            if has_bias:
                proj.bias.copy_(_bias(bias, proj.out_features, ref))
    inv_freq, rope_exact = _rope_frequencies(config, head_dim) if rope else (None, True)
    if inv_freq is not None:
        layer.rotary.set_frequencies(inv_freq)
    info = {"kind": kind, "layer_idx": getattr(module, "layer_idx", None), "model_rope": rope,
            "resid_dropout": resid_dropout, "rope_exact": rope_exact}
    return layer, info


def find_blocks(model: nn.Module) -> list[Block]:
    """Every supported self-attention block of ``model``, in module order (nothing is changed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a loaded transformers model (torch.nn.Module), got {type(model).__name__}")
    modules = dict(model.named_modules())
    blocks = []
    for path, module in modules.items():
        if _kind(module) is None:
            continue
        parent = modules[path.rsplit(".", 1)[0]] if "." in path else model
        layer, info = read_block(module, parent)
        blocks.append(Block(path=path, layer=layer, **info))
    if not blocks:
        found = sorted({type(m).__name__ for m in modules.values() if "Attention" in type(m).__name__})
        raise ValueError(f"{type(model).__name__} has no supported attention blocks (found: {found or 'none'}); "
                         f"supported: {', '.join(SUPPORTED_BLOCKS)}")
    return blocks


def attention_layers(model: nn.Module) -> dict[str, GroupedQueryAttention]:
    """{module path: our layer} for every self-attention block of a transformers model.

    Weights are copied (the model is not changed). Each layer maps the block's input
    hidden states (B, T, d) to its output before the residual (after the output projection);
    a Llama block's layer applies RoPE at positions ``arange(T)`` with the model's frequencies
    (default, linear and llama3 RoPE types; others are warned about).
    """
    blocks = find_blocks(model)
    inexact = sorted({b.path for b in blocks if not b.rope_exact})
    if inexact:
        kind = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type")
        warnings.warn(f"rope_type {kind!r} cannot be reproduced by a fixed RoPE table: the layers read from "
                      f"{len(inexact)} blocks use plain RoPE with the model's base (converted models use the "
                      f"model's own tables)", stacklevel=2)
    return {block.path: block.layer for block in blocks}
