"""Reading Hugging Face attention blocks into our layers.

A block is recognized by the structure of its attention module, not by its class name: the
registered families (:mod:`.registry`; built-in: ``mla``, ``proj``, ``qkv_proj``, ``neox``,
``gpt2``, ``bert``, one module each) are tried in registration order and the first whose parts
the module has takes it. A module matching one must have exactly that family's parts (dropouts
aside): anything else (attention sinks, a relative-position table, a norm over the whole
projection, a second query projection for gating) is reported, never silently dropped.

Head-RoPE families are checked against their module's own ``apply_rotary_pos_emb`` (a pure
function, probed on a few numbers), so a family that rotates interleaved pairs (Cohere) is
refused instead of read wrongly. Soft-capping (Gemma 2) and sliding windows (Mistral, Gemma's
sliding layers) belong to the kernel and the mask: they are reported in :class:`Block`
(``softcap``, ``sliding_window``), not applied by our layers.

:func:`read_block` turns a block into our layer, whose output is the block's output before
the residual, to float rounding. :class:`~.blocks.HFAttention` replaces the block in a model.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ...layers import Attention
from .common import sliding_window, softcap
from .registry import Family, Unsupported, families, recognize

#: {structure: (what it is, the transformers classes it is tested on)} of the built-in families, in
#: recognition order; other classes with the same structure are read as well.
STRUCTURES: dict[str, tuple[str, tuple[str, ...]]] = {f.name: (f.description, f.tested_on) for f in families()}
#: The transformers attention classes the built-in families are tested on.
SUPPORTED_BLOCKS: tuple[str, ...] = tuple(name for _, names in STRUCTURES.values() for name in names)

#: Child names that make a module look like attention (for the messages about unread modules).
_PROJECTION_NAMES = {"q", "k", "v", "o", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj",
                     "out_proj", "qkv", "qkv_proj", "c_attn", "Wqkv", "query_key_value", "in_proj", "q_lin",
                     "k_lin", "v_lin", "out_lin", "kv_a_proj_with_mqa", "kv_b_proj"}


@dataclass
class Block:
    """One supported attention block of a model.

    path: its module path (e.g. ``encoder.layer.0.attention.self``). kind: the name of its family
    (:mod:`.registry`; built-in: 'mla' | 'proj' | 'qkv_proj' | 'neox' | 'gpt2' | 'bert').
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
    """Every registered family, for messages."""
    return "; ".join(f"{f.name}: {f.description} ({', '.join(f.tested_on)})" for f in families())


def _check_parts(module: nn.Module, family: Family) -> None:
    extra = [n for n, c in module.named_children() if n not in family.parts and not isinstance(c, nn.Dropout)]
    extra += [n for n, _ in module.named_parameters(recurse=False)]
    if extra:
        raise Unsupported(f"it has parts the {family.name!r} structure does not have: {', '.join(extra)} "
                          f"(e.g. attention sinks, gating or relative positions, which our layers do not compute)")


def read_block(module: nn.Module, parent: nn.Module | None = None) -> tuple[Attention, dict]:
    """One supported block -> (our layer with its weights, facts the drop-in needs).

    The layer is the one its family reads: a :class:`~tucker_attention.layers.GroupedQueryAttention`
    (MHA when it has as many key heads as query heads) or, for DeepSeek's MLA, a
    :class:`~tucker_attention.layers.MultiHeadLatentAttention`. Facts: ``kind`` (the
    family's name), ``layer_idx``, ``model_rope``, ``resid_dropout``, ``rope_exact``,
    ``sliding_window``, ``softcap`` (see :class:`Block`). ``parent`` is the BERT-style
    block's parent (holding ``output.dense``). A module that is not a supported self-attention
    block raises TypeError naming what it holds and what is supported.
    """
    family = recognize(module)
    try:
        if family is None:
            raise Unsupported("it matches none of the supported structures")
        if _is_cross_attention(module):
            raise Unsupported("it is cross-attention; only self-attention blocks are read")
        if not isinstance(getattr(getattr(module, "config", None), "hidden_size", None), int):
            raise Unsupported("it has no config with hidden_size (a transformers attention module has)")
        _check_parts(module, family)
        rope_params = getattr(module.config, "rope_parameters", None) or {}
        if isinstance(rope_params, dict) and any("mrope_section" in p for p in [rope_params, *rope_params.values()]
                                                 if isinstance(p, dict)):
            raise Unsupported("it uses multimodal RoPE (mrope_section), which our layers do not compute")
        layer, info = family.read(module, parent)
    except Unsupported as why:
        raise TypeError(f"unsupported attention block {_describe(module)}: {why}. Supported structures: "
                        f"{_supported_text()}") from None
    info = {"kind": family.name, "layer_idx": getattr(module, "layer_idx", None), **info,
            "sliding_window": sliding_window(module, module.config), "softcap": softcap(module)}
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
        if recognize(module) is None:
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
