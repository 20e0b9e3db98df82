"""Reading Hugging Face attention blocks into our layers.

A block is recognized by the structure of its attention module, not by its class name. Each
structure (:data:`STRUCTURES`) names the parts it needs, and a module matching one must have
exactly those parts (dropouts aside): anything else (attention sinks, a relative-position
table, a norm over the whole projection, a second query projection for gating) is reported,
never silently dropped.

- ``bert``: ``query``/``key``/``value`` (nn.Linear); the output projection is the parent's
  ``output.dense`` (BERT, RoBERTa, XLM-R).
- ``gpt2``: fused ``c_attn`` (Conv1D, d -> 3d) and ``c_proj`` (GPT-2).
- ``proj``: ``q_proj``/``k_proj``/``v_proj``/``o_proj``, optional per-head RMSNorms ``q_norm``,
  ``k_norm`` before RoPE (gain w, or 1 + w as Gemma's, found by probing the norm), GQA,
  head_dim != d/h, the block's own ``scaling`` (Gemma's ``query_pre_attn_scalar``), head RoPE
  (full or partial) taken from the model's ``position_embeddings`` (Llama, Mistral, Qwen2,
  Qwen3, Gemma 2/3, SmolLM3's NoPE layers, ViT without RoPE).
- ``qkv_proj``: fused ``qkv_proj`` laid out [q | k | v] and ``o_proj`` (Phi-3).
- ``neox``: fused ``query_key_value`` laid out per head [h, 3, head_dim] and ``dense``, partial
  rotary ``rotary_ndims`` (GPT-NeoX / Pythia).
- ``mla``: ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or ``q_proj``), ``kv_a_proj_with_mqa``,
  ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj`` (DeepSeek-V2/V3): read into
  :class:`~tucker_attention.layers.MultiHeadLatentAttention` with ``latent_norm=True`` and
  decoupled RoPE; DeepSeek's interleaved RoPE pairs are permuted into our rotate-half layout
  (the same permutation on queries and keys leaves every logit unchanged), YaRN's attention
  factor is folded into the RoPE branch's weights and its mscale is in ``scale``.

Head-RoPE structures are checked against their family's own ``apply_rotary_pos_emb`` (a
pure function, probed on a few numbers), so a family that rotates interleaved pairs (Cohere)
is refused instead of read wrongly. Soft-capping (Gemma 2) and sliding windows (Mistral,
Gemma's sliding layers) belong to the kernel and the mask: they are reported in
:class:`Block` (``softcap``, ``sliding_window``), not applied by our layers.

:func:`read_block` turns a block into our layer, whose output is the block's output before
the residual, to float rounding. :class:`~.blocks.HFAttention` replaces the block in a model.

The per-structure readers and their RoPE / norm probes are in :mod:`.family_readers`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ...layers import Attention
from .readers import _linear, _read_gqa, _read_mla, _sliding_window, _softcap, _Unsupported

#: {structure: (what it is, the transformers classes it is tested on)}; other classes with the
#: same structure are read as well.
STRUCTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "bert": ("query/key/value and the parent's output.dense",
             ("BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention")),
    "gpt2": ("fused Conv1D c_attn and c_proj", ("GPT2Attention",)),
    "proj": ("q_proj/k_proj/v_proj/o_proj, optional per-head q_norm/k_norm, head RoPE (full or partial)",
             ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "Gemma2Attention",
              "Gemma3Attention", "SmolLM3Attention", "ViTAttention")),
    "qkv_proj": ("fused qkv_proj [q | k | v] and o_proj", ("Phi3Attention",)),
    "neox": ("fused query_key_value per head [h, 3, head_dim] and dense, partial RoPE", ("GPTNeoXAttention",)),
    "mla": ("q_a_proj/q_a_layernorm/q_b_proj or q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj",
            ("DeepseekV2Attention", "DeepseekV3Attention")),
}
#: The transformers attention classes the readers are tested on (every structure's families).
SUPPORTED_BLOCKS: tuple[str, ...] = tuple(name for _, names in STRUCTURES.values() for name in names)

#: The parts each structure may have (nn.Dropout children are always allowed).
_PARTS = {
    "bert": {"query", "key", "value"},
    "gpt2": {"c_attn", "c_proj"},
    "proj": {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"},
    "qkv_proj": {"qkv_proj", "o_proj"},
    "neox": {"query_key_value", "dense"},
    "mla": {"q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
            "kv_b_proj", "o_proj"},
}
#: Child names that make a module look like attention (for the messages about unread modules).
_PROJECTION_NAMES = {"q", "k", "v", "o", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj",
                     "out_proj", "qkv", "qkv_proj", "c_attn", "Wqkv", "query_key_value", "in_proj", "q_lin",
                     "k_lin", "v_lin", "out_lin", "kv_a_proj_with_mqa", "kv_b_proj"}


@dataclass
class Block:
    """One supported attention block of a model.

    path: its module path (e.g. ``encoder.layer.0.attention.self``). kind: its structure
    (:data:`STRUCTURES`: 'bert' | 'gpt2' | 'proj' | 'qkv_proj' | 'neox' | 'mla').
    layer: our layer holding a copy of its weights, read from the module at each access (so a list
    of blocks holds no copies, and a copy follows the module's current weights); ``read`` reads it.
    layer_idx: its index in the model's cache.
    model_rope: the block takes RoPE tables (``position_embeddings``) from the model (head
    RoPE; our layer reproduces it with ``rope=RopeTables(None, given=...)``).
    resid_dropout: dropout the block applies after its output projection (GPT-2).
    rope_exact: our layer's own RoPE reproduces the model's (False for dynamic / YaRN-type
    scaling of head RoPE; converted blocks use the model's tables and stay exact for head RoPE).
    sliding_window: the block's window (keys within it; the model's mask already applies it,
    the kernel gets it as ``sliding_window=``) or None. softcap: the block's logit soft-cap
    (Gemma 2; passed to the kernel as ``softcap=``) or None.
    """
    path: str
    kind: str
    read: Callable[[], Attention] = field(repr=False, compare=False)
    layer_idx: int | None
    model_rope: bool
    resid_dropout: float
    rope_exact: bool = True
    sliding_window: int | None = None
    softcap: float | None = None

    @property
    def layer(self) -> Attention:
        return self.read()


# -- recognizing blocks ------------------------------------------------------------------------------

def _conv1d(module, name: str) -> bool:
    part = getattr(module, name, None)
    return isinstance(part, nn.Module) and type(part).__name__ == "Conv1D" and isinstance(
        getattr(part, "weight", None), torch.Tensor)


def _structure(module: nn.Module) -> str | None:
    """The structure ``module`` has by its parts (:data:`STRUCTURES`), or None."""
    if _linear(module, "kv_a_proj_with_mqa") and _linear(module, "kv_b_proj") and _linear(module, "o_proj"):
        return "mla"
    if all(_linear(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "proj"
    if _linear(module, "qkv_proj") and _linear(module, "o_proj"):
        return "qkv_proj"
    if _linear(module, "query_key_value") and _linear(module, "dense"):
        return "neox"
    if _conv1d(module, "c_attn") and _conv1d(module, "c_proj"):
        return "gpt2"
    if all(_linear(module, n) for n in ("query", "key", "value")):
        return "bert"
    return None


def _is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "cross" in type(module).__name__.lower()


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    if "attention" in name or name.endswith("attn"):
        return True
    return len({n for n, _ in module.named_children()} & _PROJECTION_NAMES) >= 2


def _describe(module: nn.Module) -> str:
    """``Class(part: Type(in->out), ..., param: shape)``: what a module holds, for messages."""
    parts = []
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            parts.append(f"{name}: Linear({child.in_features}->{child.out_features})")
        elif isinstance(getattr(child, "weight", None), torch.Tensor):
            parts.append(f"{name}: {type(child).__name__}{tuple(child.weight.shape)}")
        else:
            parts.append(f"{name}: {type(child).__name__}")
    parts += [f"{name}: Parameter{tuple(p.shape)}" for name, p in module.named_parameters(recurse=False)]
    return f"{type(module).__name__}({', '.join(parts)})"


def _supported_text() -> str:
    return "; ".join(f"{kind}: {what} ({', '.join(names)})" for kind, (what, names) in STRUCTURES.items())


def _check_parts(module: nn.Module, structure: str) -> None:
    allowed = _PARTS[structure]
    extra = [n for n, c in module.named_children() if n not in allowed and not isinstance(c, nn.Dropout)]
    extra += [n for n, _ in module.named_parameters(recurse=False)]
    if extra:
        raise _Unsupported(f"it has parts the {structure!r} structure does not have: {', '.join(extra)} "
                           f"(e.g. attention sinks, gating or relative positions, which our layers do not compute)")


def read_block(module: nn.Module, parent: nn.Module | None = None) -> tuple[Attention, dict]:
    """One supported block -> (our layer with its weights, facts the drop-in needs).

    The layer is a :class:`~tucker_attention.layers.GroupedQueryAttention` (MHA when it has
    as many key heads as query heads) or, for DeepSeek's MLA, a
    :class:`~tucker_attention.layers.MultiHeadLatentAttention`. Facts: ``kind`` (the
    structure), ``layer_idx``, ``model_rope``, ``resid_dropout``, ``rope_exact``,
    ``sliding_window``, ``softcap`` (see :class:`Block`). ``parent`` is the BERT-style
    block's parent (holding ``output.dense``). A module that is not a supported self-attention
    block raises TypeError naming what it holds and what is supported.
    """
    structure = _structure(module)
    try:
        if structure is None:
            raise _Unsupported("it matches none of the supported structures")
        if _is_cross_attention(module):
            raise _Unsupported("it is cross-attention; only self-attention blocks are read")
        if not isinstance(getattr(getattr(module, "config", None), "hidden_size", None), int):
            raise _Unsupported("it has no config with hidden_size (a transformers attention module has)")
        _check_parts(module, structure)
        rope_params = getattr(module.config, "rope_parameters", None) or {}
        if isinstance(rope_params, dict) and any("mrope_section" in p for p in [rope_params, *rope_params.values()]
                                                 if isinstance(p, dict)):
            raise _Unsupported("it uses multimodal RoPE (mrope_section), which our layers do not compute")
        layer, info = _read_mla(module) if structure == "mla" else _read_gqa(module, structure, parent)
    except _Unsupported as why:
        raise TypeError(f"unsupported attention block {_describe(module)}: {why}. Supported structures: "
                        f"{_supported_text()}") from None
    info = {"kind": structure, "layer_idx": getattr(module, "layer_idx", None), **info,
            "sliding_window": _sliding_window(module, module.config), "softcap": _softcap(module)}
    return layer, info


def _read_layer(module: nn.Module, parent: nn.Module | None) -> Attention:
    return read_block(module, parent)[0]


def find_blocks(model: nn.Module) -> list[Block]:
    """Every supported self-attention block of ``model``, in module order (nothing is changed).

    A module whose parts match a structure but that computes something else raises (TypeError,
    see :func:`read_block`). Attention-like modules that match no structure raise ValueError
    when nothing else is found, else are named in a warning (they stay as they are).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a loaded transformers model (torch.nn.Module), got {type(model).__name__}")
    modules = dict(model.named_modules())
    blocks, cross = [], []
    for path, module in modules.items():
        if _structure(module) is None:
            continue
        if _is_cross_attention(module):
            cross.append(path)
            continue
        parent = modules[path.rsplit(".", 1)[0]] if "." in path else model
        _, info = read_block(module, parent)                     # checked now, read again when used
        blocks.append(Block(path=path, read=functools.partial(_read_layer, module, parent), **info))
    taken = [b.path for b in blocks] + cross
    attention_like = [p for p, m in modules.items() if p and _looks_like_attention(m)]
    unread = []
    for path in attention_like:
        inside = any(path == t or path.startswith(t + ".") for t in taken)
        wraps = any(other.startswith(path + ".") for other in attention_like + taken)
        if not inside and not wraps:
            unread.append(path)
    described = sorted({_describe(modules[p]) for p in unread})
    if not blocks:
        found = "; ".join(described) if described else "none"
        raise ValueError(f"{type(model).__name__} has no supported attention blocks (found: {found}). Supported "
                         f"structures: {_supported_text()}")
    if unread or cross:
        names = [f"{p} ({type(modules[p]).__name__})" for p in unread] + [f"{p} (cross-attention)" for p in cross]
        warnings.warn(f"{len(names)} attention-like modules are not read and stay as they are: {', '.join(names)}; "
                      f"they hold: {'; '.join(described) or '-'}", stacklevel=2)
    return blocks


def layer_stack(model: nn.Module, paths: list[str]) -> list[tuple[nn.Module, list[str]]] | None:
    """[(layer, the block paths inside it)] for every layer of the one ``nn.ModuleList`` whose layers
    hold all the blocks ``paths`` (the innermost such list), or None when there is none."""
    modules = dict(model.named_modules())
    owners = set()
    for path in paths:
        parts = path.split(".")
        lists = [i for i in range(1, len(parts)) if isinstance(modules.get(".".join(parts[:i])), nn.ModuleList)]
        if not lists:
            return None
        owners.add(".".join(parts[:lists[-1]]))
    if len(owners) != 1:
        return None
    (owner,) = owners
    stack = [(layer, [p for p in paths if p.startswith(f"{owner}.{i}.")])
             for i, layer in enumerate(modules[owner])]
    return stack if paths and sum(len(inside) for _, inside in stack) == len(paths) else None


def attention_layers(model: nn.Module, *, lazy: bool = False) -> Mapping[str, Attention]:
    """{module path: our layer} for every self-attention block of a transformers model.

    Weights are copied (the model is not changed); ``lazy``: a read-only mapping that reads a
    block's layer each time it is looked up (a fresh copy: one block's in memory at a time, for
    passes over a large model), not a dict of all of them. Each layer maps the block's input
    hidden states (B, T, d) to its output before the residual (after the output projection);
    a head-RoPE block's layer applies RoPE at positions ``arange(T)`` with the model's
    frequencies (default, linear and llama3 RoPE types, per layer type as Gemma 3's; others
    are warned about). Sliding windows are the mask's (pass ``attn_mask``); logit soft-capping
    (Gemma 2) is not applied by our layers, which is warned about.
    """
    blocks = find_blocks(model)
    inexact = sorted({b.path for b in blocks if not b.rope_exact})
    if inexact:
        params = getattr(model.config, "rope_parameters", None) or {}
        kinds = sorted({str(p.get("rope_type")) for p in params.values() if isinstance(p, dict)}
                       or {str(params.get("rope_type"))})
        kind = kinds[0] if len(kinds) == 1 else kinds
        warnings.warn(f"rope_type {kind!r} cannot be reproduced by a fixed RoPE table: the layers read from "
                      f"{len(inexact)} blocks use plain RoPE with the model's base (converted models use the "
                      f"model's own tables)", stacklevel=2)
    capped = [b for b in blocks if b.softcap is not None]
    if capped:
        warnings.warn(f"{len(capped)} blocks soft-cap their attention logits (softcap={capped[0].softcap}); the "
                      f"standalone layers do not (a converted model passes softcap to the model's kernel)",
                      stacklevel=2)
    return _Layers(blocks) if lazy else {block.path: block.layer for block in blocks}


class _Layers(Mapping):
    def __init__(self, blocks: list[Block]):
        self._blocks = {b.path: b for b in blocks}

    def __getitem__(self, path: str) -> Attention:
        return self._blocks[path].layer

    def __iter__(self):
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)
