"""Converted models as ordinary transformers models: their config and model classes.

A converted model is an instance of ``Tucker<Base>`` (e.g. ``TuckerLlamaForCausalLM``), a
subclass of its original class whose config class ``Tucker<Base>Config`` has model type
``tucker_<base>`` and carries ``tucker_attention`` (the method and every block's layer
config). Building one builds the original skeleton, then puts an
:class:`~.blocks.HFAttention` in every converted block, so the state dict is the converted
model's and ``save_pretrained`` / ``from_pretrained`` round-trip it exactly (safetensors).

A saved folder loads in three ways:

- ``AutoModelForCausalLM.from_pretrained(dir)`` after ``import tucker_attention.hf``: the
  model types are registered with the Auto classes here (:func:`register`);
- ``from_pretrained(dir, trust_remote_code=True)`` in any Python with tucker-attention
  installed: the folder holds ``configuration_tucker_attention.py`` /
  ``modeling_tucker_attention.py`` (two lines each, importing this module) and an ``auto_map``;
- neither: transformers does not know ``tucker_<base>`` and refuses to load it, asking for
  ``trust_remote_code=True`` (it never builds the original model with random attention).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from torch import nn

from ..families.registry import family_named
from ..sources.readable import check_readable
from .blocks import HFAttention
from .cache import SharedRope
from .folder_checks import EDITED, ConvertedFolderError, build_layer, check_layout, in_body, loaded_checks, where

CONFIG_FILE = "configuration_tucker_attention.py"
MODELING_FILE = "modeling_tucker_attention.py"
#: The Auto classes a converted model registers with (when its base class is in their mapping).
AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageClassification",
                "AutoModelForSequenceClassification", "AutoModelForMaskedLM", "AutoModelForTokenClassification",
                "AutoModelForQuestionAnswering")
#: Base model types registered on import (others register when converted, or load as remote code).
FAMILIES = ("bert", "roberta", "xlm-roberta", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
            "gemma3_text", "phi3", "gpt_neox", "deepseek_v2", "deepseek_v3", "vit")
#: ids of the configs whose skeleton is being built (a head model builds its base model inside).
_BUILDING: set[int] = set()


def _transformers():
    import transformers

    return transformers


class TuckerConfigMixin:
    """What every converted config adds to its base config: the ``tucker_attention`` spec."""

    tucker_attention: dict | None = None

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """No-op: a converted folder carries its own two-line code files (see :func:`write_code_files`)."""


@functools.cache
def config_class(base_type: str) -> type:
    """``Tucker<Base>Config`` for the transformers model type ``base_type`` (e.g. 'llama')."""
    transformers = _transformers()
    base = transformers.CONFIG_MAPPING[base_type]
    name = "Tucker" + base.__name__
    return type(name, (TuckerConfigMixin, base), {"model_type": "tucker_" + base_type, "__module__": __name__,
                                                  "__qualname__": name})


class TuckerModelMixin:
    """What every converted model adds to its base class: converted blocks from the config.

    Building from a config builds the original skeleton (with the original key-head layout
    when the config declares a serving one), then installs the blocks of ``config.tucker_attention``.
    """

    _supports_attention_backend = True
    _supports_sdpa = True                 # every converted block calls the attention interface
    _supports_flex_attn = True

    def __init__(self, config, *args, **kwargs):
        spec = getattr(config, "tucker_attention", None)
        if not spec:
            raise ValueError(f"{type(self).__name__} needs a converted config (with tucker_attention); "
                             f"convert a model with tucker_attention.hf.convert")
        nested = id(config) in _BUILDING                   # a head model building its base model inside
        _BUILDING.add(id(config))
        try:
            with source_layout(config):
                super().__init__(config, *args, **kwargs)
        finally:
            if not nested:
                _BUILDING.discard(id(config))
        install_blocks(self, spec)
        if not nested:                                     # the config shows its own layout again
            check_layout(config, spec, [self.get_submodule(_resolve(self, p)).layer for p in spec["blocks"]])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, refusing a folder whose weights do not all load as its
        config declares (:func:`~.folder_checks.loaded_checks`: no tensor of ours is left uninitialised)."""
        wants_info = kwargs.pop("output_loading_info", False)
        ignores = kwargs.pop("ignore_mismatched_sizes", False)     # a new head's shape may differ; the body's not
        local = isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isdir(
            pretrained_model_name_or_path)
        if local:
            check_readable(pretrained_model_name_or_path)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
        mismatched = [m for m in info.get("mismatched_keys", ()) if not ignores or in_body(model, m[0])]
        loaded_checks(model, {**info, "mismatched_keys": mismatched}, str(pretrained_model_name_or_path),
                      same_head=cls.__bases__[1].__name__ == model.config.tucker_attention.get("model_class"))
        return (model, info) if wants_info else model

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """No-op: a converted folder carries its own two-line code files (see :func:`write_code_files`)."""

    def initialize_weights(self):
        """transformers' (re)initialization (e.g. of RoPE buffers after a meta-device load) reads the
        config: it sees the source layout, as the skeleton was built with it."""
        with source_layout(self.config):
            super().initialize_weights()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained`` (safetensors), plus the code files and ``auto_map`` that
        let ``from_pretrained(dir, trust_remote_code=True)`` rebuild the model anywhere."""
        self.config.auto_map = auto_map(type(self))
        super().save_pretrained(save_directory, *args, **kwargs)
        write_code_files(Path(save_directory), type(self))


@functools.cache
def model_class(base_name: str) -> type:
    """``Tucker<Base>`` for the transformers model class named ``base_name`` (e.g. 'LlamaForCausalLM')."""
    transformers = _transformers()
    base = getattr(transformers, base_name, None)
    if base is None:
        raise ValueError(f"transformers {transformers.__version__} has no model class {base_name!r}")
    config_cls = config_class(base.config_class.model_type)
    name = "Tucker" + base_name
    return type(name, (TuckerModelMixin, base), {"config_class": config_cls, "__module__": __name__,
                                                 "__qualname__": name})


def _auto_classes(base: type) -> dict[str, type]:
    """{Auto class name: Auto class} whose mapping holds ``base``'s config -> ``base``'s family."""
    transformers = _transformers()
    found = {}
    for auto_name in AUTO_CLASSES:
        auto = getattr(transformers, auto_name)
        try:
            mapped = auto._model_mapping[base.config_class]
        except KeyError:
            continue
        found[auto_name] = mapped if not isinstance(mapped, (tuple, list)) else mapped[0]
    return found


def auto_map(cls: type) -> dict[str, str]:
    """The ``auto_map`` of a saved converted model: its config and every Auto class of its family."""
    base = cls.__bases__[1]
    entries = {"AutoConfig": f"{CONFIG_FILE[:-3]}.{cls.config_class.__name__}"}
    for auto_name, mapped in _auto_classes(base).items():
        entries[auto_name] = f"{MODELING_FILE[:-3]}.Tucker{mapped.__name__}"
    entries.setdefault(_auto_name(base), f"{MODELING_FILE[:-3]}.{cls.__name__}")
    return entries


def _auto_name(base: type) -> str:
    return next((name for name, mapped in _auto_classes(base).items() if mapped is base), "AutoModel")


def write_code_files(folder: Path, cls: type) -> None:
    """The two code files of a converted folder: each imports its classes from this module."""
    base = cls.__bases__[1]
    base_type = cls.config_class.model_type.removeprefix("tucker_")
    names = {f"Tucker{m.__name__}": m.__name__ for m in _auto_classes(base).values()}
    names.setdefault(cls.__name__, base.__name__)
    header = ('"""Written by tucker-attention: this model\'s attention is converted (Tucker / GQA / MLA).\n\n'
              'Loading it needs the package: pip install tucker-attention\n"""\n\n')
    (folder / CONFIG_FILE).write_text(header + "from tucker_attention.hf.auto import config_class\n\n"
                                      f"{cls.config_class.__name__} = config_class({base_type!r})\n")
    (folder / MODELING_FILE).write_text(header + "from tucker_attention.hf.auto import model_class\n\n" + "".join(
        f"{ours} = model_class({theirs!r})\n" for ours, theirs in sorted(names.items())))


@contextlib.contextmanager
def source_layout(config):
    """Inside: the config's original key-head fields (a serving layout rewrites them), so the
    original skeleton builds exactly as the source model did."""
    spec = getattr(config, "tucker_attention", None) or {}
    if not spec.get("serving"):
        yield config
        return
    saved = spec.get("source_layout") or {}
    current = {name: getattr(config, name) for name in spec["serving"]}
    try:
        for name in spec["serving"]:
            if name in saved:
                setattr(config, name, saved[name])
            else:
                delattr(config, name)                     # the source config had no such field
        yield config
    finally:
        for name, value in current.items():
            setattr(config, name, value)


def _resolve(model: nn.Module, path: str) -> str:
    """A block path of the spec inside ``model``: spec paths are those of the converted model, which
    may be the head model while this is its base model (or the other way round)."""
    prefix = getattr(model, "base_model_prefix", "")
    modules = dict(model.named_modules())
    for candidate in (path, path.removeprefix(prefix + "."), f"{prefix}.{path}"):
        if candidate in modules:
            return candidate
    raise ValueError(f"converted block {path!r} is not a module of {type(model).__name__}")


def place_block(model: nn.Module, path: str, layer, facts: dict, rope_source: SharedRope) -> HFAttention:
    """Put an :class:`HFAttention` running ``layer`` at block ``path`` of ``model`` (the one place a
    converted block is installed, by ``convert`` and when a saved model is built). facts: the
    block entries of the spec (kind, layer_idx, model_rope, resid_dropout, sliding_window, softcap)."""
    parent_path, _, name = _resolve(model, path).rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    block = HFAttention(layer, kind=facts["kind"], layer_idx=facts["layer_idx"], model_rope=facts["model_rope"],
                        resid_dropout=facts["resid_dropout"], sliding_window=facts.get("sliding_window"),
                        softcap=facts.get("softcap"), config=model.config, rope_source=rope_source)
    setattr(parent, name, block.train(parent.get_submodule(name).training))
    for part in family_named(facts["kind"]).outside_parts:   # computed by our layer (BERT's output.dense)
        parent.set_submodule(part, nn.Identity())
    return block


@contextlib.contextmanager
def block_swapped(model: nn.Module, path: str, layer, facts: dict):
    """``model`` running ``layer`` at block ``path`` (:func:`place_block`) inside the block; on leaving,
    everything ``place_block`` changed is as it was (the original module, a BERT output projection)."""
    parent_path, _, name = _resolve(model, path).rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, name)
    outside = {part: parent.get_submodule(part) for part in family_named(facts["kind"]).outside_parts}
    place_block(model, path, layer, facts, SharedRope())
    try:
        yield model
    finally:
        setattr(parent, name, original)
        for part, module in outside.items():
            parent.set_submodule(part, module)


def install_blocks(model: nn.Module, spec: dict) -> None:
    """Put a fresh :class:`HFAttention` for every block of ``spec`` into ``model`` (weights to be loaded)."""
    rope_source = SharedRope()
    for path, facts in spec["blocks"].items():
        try:
            _resolve(model, path)
        except ValueError as err:
            raise ConvertedFolderError(f"{where(model.config)}: {err}; {EDITED}") from None
        place_block(model, path, build_layer(model.config, path, facts), facts, rope_source)


def converted_class(model: nn.Module) -> type:
    """``Tucker<Base>`` for ``model``'s class, checked before anything is converted: the class must be
    transformers' own (a saved folder names it), with a config of its own model type."""
    base = type(model)
    transformers = _transformers()
    if getattr(transformers, base.__name__, None) is not base:
        raise TypeError(f"{base.__module__}.{base.__name__} is not a transformers model class (remote code or a "
                        f"subclass); converted models are subclasses of transformers' own classes, so convert a "
                        f"model built from one of them")
    if not isinstance(getattr(model, "config", None), base.config_class):
        raise TypeError(f"{base.__name__} has a {type(getattr(model, 'config', None)).__name__} config, expected "
                        f"{base.config_class.__name__}")
    return model_class(base.__name__)


def to_converted_classes(model: nn.Module) -> None:
    """Turn a model whose blocks were just converted into its ``Tucker<Base>`` class (in place)."""
    base = type(model)
    cls = converted_class(model)
    register(base.config_class.model_type)
    model.config.__class__ = config_class(base.config_class.model_type)
    model.__class__ = cls


def register(base_type: str) -> None:
    """Register ``tucker_<base_type>`` with AutoConfig and the family's Auto model classes."""
    transformers = _transformers()
    config_cls = config_class(base_type)
    transformers.AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    base_config = transformers.CONFIG_MAPPING[base_type]
    for auto_name in AUTO_CLASSES:
        auto = getattr(transformers, auto_name)
        try:
            mapped = auto._model_mapping[base_config]
        except KeyError:
            continue
        mapped = mapped if not isinstance(mapped, (tuple, list)) else mapped[0]
        auto.register(config_cls, model_class(mapped.__name__), exist_ok=True)


def register_families() -> None:
    """Register every family of :data:`FAMILIES` this transformers has (called on import)."""
    transformers = _transformers()
    for base_type in FAMILIES:
        if base_type in transformers.CONFIG_MAPPING:
            register(base_type)
