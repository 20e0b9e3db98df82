"""Converting a transformers model's attention to Tucker / GQA / MLA, and saving the result.

``convert(model, 'tucker', ranks=(r1, r2, r3))`` replaces every supported block (see
:mod:`.blocks`) by an :class:`~.blocks.HFAttention` running our layer, initialized from the
block's weights: truncated HOSVD (``compress``) for Tucker, the SVD baselines for GQA/MLA.
Without ``ranks`` (full rank) the model's outputs are unchanged, biases included.

The converted model is an instance of ``Tucker<Base>`` (see :mod:`.auto`): ``save_pretrained``
writes a standard folder that ``from_pretrained`` loads exactly.

Sources with head-dimension RoPE (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-NeoX) keep it exactly:
Tucker and MLA get latent RoPE whose pairs carry the heads' frequencies, GQA merges key heads
pair by pair (:mod:`tucker_attention.tensors.rope`), so at full rank the converted model's
outputs equal the original's. DeepSeek's decoupled RoPE becomes latent RoPE exactly for Tucker.
What stays inexact (norms inside the attention, a RoPE type whose frequencies change with the
sequence length) is warned about once per reason.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..._checks import check_choice
from ...layers import Attention, make_attention
from ...settings.convert import QK_NORMS
from ...tensors import (
    METHODS,
    RankPlan,
    conversion_method,
    convert_layer,
    heads_form_applies,
    input_transform,
    to_tucker_heads,
)
from ...tensors import plan_ranks as tensor_plan_ranks
from ...tensors import plan_uniform as tensor_plan_uniform
from ..families.reading import Block, find_blocks
from ..modeling.auto import config_class, converted_class, model_class, place_block, to_converted_classes
from ..modeling.blocks import HFAttention, layout_of
from ..modeling.cache import SharedRope
from ..modeling.folder_checks import ConvertedFolderError
from ..sources.compute import release_memory
from ..sources.readable import check_readable
from .calibration import BlockStatistics

SPEC_FILE = "tucker_attention.json"


def _with_rope(layer: Attention, source: Attention) -> Attention:
    """The same weights in a layer with ``source``'s RoPE in the layer's own positional mode: head
    RoPE keeps the source's rotated width (partial RoPE); latent RoPE rotates the latent."""
    mode = type(layer).rope_mode(True)
    extra = {"rope_dim": source.config().get("rope_dim")} if mode == "head" and source.rope == "head" else {}
    new = make_attention(**{**layer.config(), "rope": True, "rope_base": source.rope_base, **extra})
    new = new.to(next(layer.parameters())).train(layer.training)
    new.load_state_dict(layer.state_dict())
    return new


def _ignores_rope(source: Attention, method: str) -> bool:
    """Whether converting ``source`` to ``method`` cannot keep its RoPE exactly (then its weights at
    offset 0 are converted and the result gets ``method``'s own RoPE): the method's ``keeps_rope``
    (GQA and MLA keep head RoPE, Tucker every kind)."""
    return not conversion_method(method).keeps(source.rope)


def _keeps_heads(source: Attention, method: str, ranks, value_ranks, qk_norm: str) -> bool:
    """Whether ``source`` converts to a TuckerHeadsAttention: tucker (a method with ``norm_forms``) of a
    q/k-norm GQA layer with ``qk_norm='keep'``, unless its plain Tucker form keeps the norms already (one
    key head, full rank)."""
    return (conversion_method(method).norm_forms and qk_norm == "keep" and heads_form_applies(source)
            and not _keeps_norms(source, method, ranks, value_ranks))


def _keeps_norms(source: Attention, method: str, ranks, value_ranks=None) -> bool:
    """Whether a non-linear source converts with its norms kept exactly (full-rank Tucker of a layer
    whose exact form keeps them: one key head under q/k norms), not linearized."""
    return conversion_method(method).norm_forms and ranks is None and value_ranks is None and source.exact_with_norms()


def inexact_reasons(source: Attention, method: str, ranks, qk_norm: str = "keep") -> list[str]:
    """Why converting ``source`` to ``method`` at ``ranks`` changes its outputs beyond truncation
    (empty when the conversion is exact at full rank)."""
    native = source.native_setting(method)
    if native is not None and ranks in (None, native):
        return []                                               # a copy of the block
    reasons = []
    if (source.nonlinearity() and not _keeps_norms(source, method, ranks)
            and not _keeps_heads(source, method, ranks, None, qk_norm)):
        reasons.append(f"{source.nonlinearity()} has no linear tensor form: each norm becomes its gain times "
                       f"the 1/rms its inputs had on the calibration inputs (Attention.linearized)")
    if _ignores_rope(source, method):
        kept = " or ".join(conversion_method(method).keeps_rope) or "no"
        reasons.append(f"{source.rope} RoPE becomes {method}'s own RoPE on the weights at offset 0 (only {kept} "
                       f"RoPE converts exactly to {method}): a different positional scheme")
    return reasons


def per_block(name: str, value, blocks: list[Block]) -> Sequence:
    """A list has one setting per block, a dict one per block path; anything else (a tuple, an
    int, None) is one setting for every block."""
    paths = [b.path for b in blocks]
    if isinstance(value, Mapping):
        unknown, missing = sorted(set(value) - set(paths)), [p for p in paths if p not in value]
        if unknown or missing:
            raise ValueError(f"{name} as a dict needs exactly the block paths {paths}; "
                             f"unknown: {unknown}, missing: {missing}")
        return _InOrder(value, paths)
    if isinstance(value, list):
        if len(value) != len(blocks):
            raise ValueError(f"{name} as a list needs one entry per attention block ({len(blocks)}), got "
                             f"{len(value)}; pass a tuple for one setting for every block")
        return value
    return [value] * len(blocks)


class _InOrder(Sequence):
    """A mapping's values in the order of ``keys``, each read when it is used (a
    :class:`~.spill.SpilledStatistics` loads one block's statistics at a time)."""

    def __init__(self, mapping: Mapping, keys: list):
        self._mapping, self._keys = mapping, keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int):
        return self._mapping[self._keys[index]]


def _whitenings(input_cov, method: str) -> tuple[tuple, tuple] | None:
    """((S, S_value), (S^-1, S_value^-1)) for :func:`~tucker_attention.tensors.input_transform` from a
    block's statistics (a (d, d) second moment or :class:`~.calibration.BlockStatistics`); S_value is
    None without mixed statistics, and for a method whose one latent serves keys and values alike (MLA)."""
    if input_cov is None:
        return None
    stats = input_cov if isinstance(input_cov, BlockStatistics) else BlockStatistics(input_cov)
    (S, S_inv), value = stats.whitenings(mixed=not conversion_method(method).shared_latent)
    V, V_inv = value if value is not None else (None, None)
    return (S, V), (S_inv, V_inv)


def _heads_layer(source: Attention, ranks, value_ranks, whiten) -> Attention:
    """The TuckerHeadsAttention of a q/k-norm source at ``ranks`` (None: exact; each capped at the exact
    form's), truncated in the whitened basis when ``whiten`` is given."""
    exact = to_tucker_heads(source if whiten is None else input_transform(source, *whiten[0]))
    if ranks is not None:
        value_ranks = value_ranks if value_ranks is not None else ranks
        exact = exact.truncated(tuple(min(r, top) for r, top in zip(ranks, exact.ranks)),
                                tuple(min(r, top) for r, top in zip(value_ranks, exact.value_ranks)))
    return exact if whiten is None else input_transform(exact, *whiten[1])


def convert_block(source: Attention, method: str, ranks=None, value_ranks=None, *, input_cov=None,
                  hosvd: str = "hosvd", n_iter: int = 10, nope_fraction: float = 0.0,
                  qk_norm: str = "keep") -> Attention:
    """Our layer for ``method`` from a block's layer (from :func:`~.read.read_block`).

    tucker: ``ranks`` (r1, r2, r3), ``value_ranks`` (default ``ranks``); None = (H, d, d), or the
    exact latent-RoPE form of a RoPE source. gqa: ``ranks`` = n_kv_heads (None: the source's).
    mla: ``ranks`` = kv_rank or (kv_rank, q_rank) (None: d_model, full-rank queries; every key pair
    and value direction of a head-RoPE source; an MLA source's own kv_rank: a copy). RoPE is
    kept exactly where :func:`_ignores_rope` says so (see the module docstring).
    input_cov: the second moment (d, d) of the block's inputs (:func:`~.calibration.input_statistics`)
    or its :class:`~.calibration.BlockStatistics` (:func:`~.calibration.attention_statistics`): the
    truncation then minimizes the error on such inputs instead of on the weights alone (values on
    the attention-mixed inputs when measured), and a non-linear source (q/k norms) is linearized
    with the norms' scales on such inputs (at full rank Tucker keeps one key head's q/k norms).
    nope_fraction: partial RoPE for Tucker / MLA of a RoPE source (:func:`tucker_attention.tensors.rope.derotated`).
    qk_norm: per-head q/k norms under Tucker: 'keep' (default) converts to a
    :class:`~tucker_attention.layers.TuckerHeadsAttention` (the latent cached, key heads formed, normed
    and rotated from it when attending: exact at full rank, RoPE exact at any; partial RoPE does not
    apply), 'linearize' to the absorbed Tucker form with each norm linearized.
    A source that already has the target structure and setting is copied (exact, norms kept).
    """
    check_choice("method", method, METHODS)
    check_choice("qk_norm", qk_norm, QK_NORMS)
    native = source.native_setting(method)
    if native is not None and ranks in (None, native) and not nope_fraction:
        return copy.deepcopy(source)
    whiten = _whitenings(input_cov, method)
    if _keeps_heads(source, method, ranks, value_ranks, qk_norm):
        return _heads_layer(source, ranks, value_ranks, whiten).train(source.training)
    inputs = input_cov.inputs if isinstance(input_cov, BlockStatistics) else input_cov
    linear = source if _keeps_norms(source, method, ranks, value_ranks) else source.linearized(inputs)
    ignore = _ignores_rope(source, method)
    options = {"value_ranks": value_ranks, "hosvd": hosvd, "n_iter": n_iter, "ignore_rope": ignore,
               "nope_fraction": nope_fraction}
    if whiten is None:
        layer = convert_layer(linear, method, ranks, **options)
    else:
        forward, back = whiten
        layer = input_transform(convert_layer(input_transform(linear, *forward), method, ranks, **options), *back)
    layer = _with_rope(layer, source) if ignore else layer
    return layer.train(source.training)


def convert(model: nn.Module, method: str = "tucker", ranks=None, *, value_ranks=None, calibration=None,
            hosvd: str = "hosvd", n_iter: int = 10, nope_fraction: float = 0.0, inplace: bool = True,
            share_weights: bool = False, dtype: torch.dtype | None = None, qk_norm: str = "keep",
            progress: bool = False) -> nn.Module:
    """Replace every supported attention block of a transformers model by ``method``.

    ranks: one setting for every block (a tuple or int), a list (one per block, in module
        order) or a {block path: setting} dict; see :func:`convert_block` (None = full rank, exact
        without RoPE). value_ranks: Tucker's W_tilde ranks, same forms.
    calibration: {block path: input second moment (d, d)} from
        :func:`~.calibration.input_statistics`, or {block path: BlockStatistics} from
        :func:`~.calibration.attention_statistics` (activation-aware truncation; much closer
        outputs on real inputs, measured on MiniLM in the README). None: weights only.
    hosvd: 'hosvd' | 'hooi' for Tucker. nope_fraction: partial RoPE for Tucker / MLA (the lowest
        frequencies stop rotating, see :func:`tucker_attention.tensors.rope.derotated`; 0: exact RoPE).
    inplace: convert ``model`` itself (default) or a copy; ``share_weights``: the copy's parameters and
        buffers outside the converted blocks are the model's own tensors (no memory; a change to one
        is a change to both), as a conversion pipeline measuring candidates wants.
    dtype: of the new layers (default: each block's own weights'; the conversion math runs in at
        least float32 whatever the model's dtype, see :func:`~tucker_attention.hf.families.common.reading_dtype`).
    qk_norm: 'keep' | 'linearize': per-head q/k norms under Tucker (see :func:`convert_block`).
    progress: a progress bar over the blocks.

    All new layers are built before the model is touched: on any error the model is
    unchanged. The model's config gains ``tucker_attention`` = {method, blocks}.
    """
    check_choice("method", method, METHODS)
    check_choice("qk_norm", qk_norm, QK_NORMS)
    if getattr(getattr(model, "config", None), "tucker_attention", None):
        raise ValueError("this model's attention was already converted; convert the original model")
    if hasattr(model, "config"):
        converted_class(model)                      # a class we can save, checked before any change
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())} if share_weights else {}
    target = model if inplace else copy.deepcopy(model, memo)
    blocks = find_blocks(target)
    rank_list = per_block("ranks", ranks, blocks)
    value_list = per_block("value_ranks", value_ranks, blocks)
    if value_ranks is not None and "value_ranks" not in conversion_method(method).options:
        takers = " or ".join(repr(m) for m in METHODS if "value_ranks" in conversion_method(m).options)
        raise ValueError(f"value_ranks is for method={takers}, got method={method!r}")
    covs = per_block("calibration", calibration, blocks) if calibration is not None else [None] * len(blocks)
    from tqdm.auto import tqdm

    layers = []
    for block, r, vr, cov in tqdm(zip(blocks, rank_list, value_list, covs), total=len(blocks),
                                  desc=f"convert to {method}", unit="block", disable=not progress, leave=False):
        try:
            layers.append(convert_block(block.layer, method, r, vr, input_cov=cov, hosvd=hosvd, n_iter=n_iter,
                                        nope_fraction=nope_fraction, qk_norm=qk_norm))
        except (ValueError, TypeError) as err:
            raise type(err)(f"block {block.path}: {err}") from None
        del cov
        release_memory(collect=False)                   # the block's working set (freed by refcount), before the next
    reasons: dict[str, int] = {}
    for block, r, layer in zip(blocks, rank_list, layers):
        found = inexact_reasons(block.layer, method, r, qk_norm)
        if nope_fraction and layer.rope == "latent":
            found.append(f"partial RoPE (nope_fraction={nope_fraction}) stops the lowest RoPE frequencies rotating")
        if not block.rope_exact and layer.rope is not None and not (block.model_rope and layer.rope == "head"):
            found.append("the model's rope_type changes its frequencies with the sequence length, which the "
                         "converted layer's fixed RoPE frequencies do not")
        for reason in found:
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():                    # once per reason, not per block
        warnings.warn(f"{type(model).__name__} -> {method}: in {count} of {len(blocks)} blocks {reason}, so the "
                      f"converted model's outputs differ from the original's even at full rank (the fidelity report "
                      f"measures by how much; fine-tuning recovers it)", stacklevel=2)
    rope_source = SharedRope()                                  # one table source for the model's blocks
    for block, layer in zip(blocks, layers):
        stored = next(target.get_submodule(block.path).parameters(), None)
        layer = layer.to(dtype or (stored.dtype if stored is not None else layer.dtype))
        place_block(target, block.path, layer, block_facts(block, layer), rope_source)
    if hasattr(target, "config"):
        spec = {"method": method, "model_class": type(target).__name__,
                "blocks": {b.path: target.get_submodule(b.path).spec() for b in blocks}}
        spec.update(serving_layout(target.config, [target.get_submodule(b.path).layer for b in blocks]))
        target.config.tucker_attention = spec
        to_converted_classes(target)
    return target


def block_facts(block: Block, layer: Attention) -> dict:
    """The spec entries :func:`~.auto.place_block` needs to run ``layer`` in ``block``'s place."""
    return {"kind": block.kind, "layer_idx": block.layer_idx, "resid_dropout": block.resid_dropout,
            "model_rope": (block.model_rope and layer.rope == "head"    # takes the model's RoPE tables, unless
                           and not layer.rotates_keys_on_read()),        # it needs them at every cached key
            "sliding_window": block.sliding_window, "softcap": block.softcap}


def serving_layout(config, layers: list[Attention]) -> dict:
    """The config a paged-attention server sizes its KV cache from (:func:`~.blocks.layout_of`), set in place;
    returns {'serving': the layout or None, 'source_layout': the original values, restored to rebuild
    the skeleton; fields it lacked are left out}."""
    layout = layout_of(layers)
    if layout is None:
        return {"serving": None}
    source = {name: getattr(config, name) for name in layout if name in vars(config)}  # absent: rebuilt absent
    for name, value in layout.items():
        setattr(config, name, value)
    return {"serving": layout, "source_layout": source}


def converted_blocks(model: nn.Module) -> dict[str, HFAttention]:
    """{path: HFAttention} of a converted model."""
    return {path: m for path, m in model.named_modules() if isinstance(m, HFAttention)}


def save_converted(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, generation_config=None) -> Path:
    """``model.save_pretrained(path)`` (a standard folder, see :mod:`.auto`), plus the tokenizer
    and generation config when given (default: the model's own generation config)."""
    if not getattr(getattr(model, "config", None), "tucker_attention", None):
        raise ValueError("model is not a converted model (no config.tucker_attention); use tucker_attention.hf.convert")
    path = Path(path)
    model.save_pretrained(path)
    if generation_config is not None:
        generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_converted(path: str | os.PathLike, *, device: str | torch.device = "cpu", **kwargs) -> nn.Module:
    """A converted model from a folder written by ``save_pretrained`` (or by the older
    ``save_converted`` with a ``tucker_attention.json``), offline, in eval mode; ``kwargs`` go to
    ``from_pretrained`` (e.g. ``dtype``, ``attn_implementation``)."""
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a converted model folder: config.json is missing "
                                f"(write one with model.save_pretrained after tucker_attention.hf.convert)")
    check_readable(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    spec = getattr(config, "tucker_attention", None)
    if spec and not config.model_type.startswith("tucker_"):
        raise ConvertedFolderError(f"{str(path)!r}: config.json has a tucker_attention section but model_type "
                                   f"{config.model_type!r}, which builds the original attention with random weights; "
                                   f"restore model_type 'tucker_{config.model_type}'")
    if not spec and (path / SPEC_FILE).is_file():                  # the older folder layout
        spec = json.loads((path / SPEC_FILE).read_text())
        config.tucker_attention = spec
        config.__class__ = config_class(type(config).model_type)
    if not spec:
        raise ValueError(f"{path} holds a {config.model_type!r} model that was not converted "
                         f"(no tucker_attention in its config); convert it with tucker_attention.hf.convert")
    cls = model_class(spec["model_class"])
    return cls.from_pretrained(path, config=config, local_files_only=True, **kwargs).to(device).eval()


def plan_ranks(model: nn.Module, *, params=None, kv=None, calibration=None) -> RankPlan:
    """Tucker ranks per block of a transformers model for a budget of attention parameters or
    KV floats per token (count, or fraction of the model's); see :func:`tucker_attention.tensors.plan_ranks`.
    With ``calibration`` (as for :func:`convert`) spectra and errors are those of the
    activation-weighted tensors (S W S, W~ S). Layers with norms between their projections
    are planned from their linearization, as :func:`convert` converts them.

    >>> plan = plan_ranks(model, params=0.25)                                 # doctest: +SKIP
    >>> convert(model, "tucker", ranks=plan.ranks, value_ranks=plan.value_ranks)  # doctest: +SKIP
    """
    return tensor_plan_ranks(planning_layers(model, calibration), params=params, kv=kv)


def plan_uniform(model: nn.Module, *, params=None, kv=None, calibration=None, r3: int | None = None) -> RankPlan:
    """One Tucker setting for every block of a transformers model within a budget (see
    :func:`tucker_attention.tensors.plan_uniform`; r3 given or the largest that fits); errors as
    for :func:`plan_ranks`."""
    return tensor_plan_uniform(planning_layers(model, calibration), params=params, kv=kv, r3=r3)


def planning_layers(model: nn.Module, calibration, method: str = "tucker") -> Mapping[str, Attention]:
    """The model's layers as a conversion to ``method`` sees them: linearized, and whitened by the
    calibration; each computed when it is read (a plan reads each once), so one is in memory at a time."""
    return _Planning(find_blocks(model), calibration, method)


class _Planning(Mapping):
    def __init__(self, blocks: list[Block], calibration, method: str):
        self._blocks = {b.path: b for b in blocks}
        self._covs = None if calibration is None else per_block("calibration", calibration, blocks)
        self._method = method

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self):
        return iter(self._blocks)

    def __getitem__(self, path: str) -> Attention:
        layer = self._blocks[path].layer
        if self._covs is None:
            return layer.linearized()
        cov = self._covs[list(self._blocks).index(path)]               # read now (spilled statistics: from disk)
        inputs = cov.inputs if isinstance(cov, BlockStatistics) else cov
        return input_transform(layer.linearized(inputs), *_whitenings(cov, self._method)[0])
