"""The conversion methods ('tucker', 'gqa', 'mla', ...): one :class:`ConversionMethod` record per method
in one registry, which everything that converts reads (:func:`convert_layer`, the planners of
:mod:`.budget`, ``tucker_attention.hf.convert``, ``tucker-attn convert`` / ``compress`` and the experiments).

A method is added by one file that builds a record and calls :func:`register` (the built-in ones:
:mod:`.builtin_methods`; tests/test_new_conversion.py adds one from outside the package).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..layers import Attention

#: The keyword options of a converter beyond ``ignore_rope``, with the value that means "not used".
OPTIONS = {"value_ranks": None, "hosvd": "hosvd", "n_iter": 10, "nope_fraction": 0.0}


class SettingError(ValueError):
    """A setting a source layer cannot take: ``argument`` names what was given ('ranks' / 'value_ranks')."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument, self.message = argument, message


@dataclass(frozen=True)
class ConversionMethod:
    """One conversion method: its setting, its converter, its checks and planner, and what it keeps.

    A setting is one integer or a tuple of integers (``counts``: how many it may be given as, e.g.
    gqa (1,): n_kv_heads; mla (1, 2): kv_rank or (kv_rank, q_rank); tucker (3,): (r1, r2, r3)); None
    means full rank. ``names`` name its parts in labels and messages (one name for a tuple that is
    one thing, tucker's ``ranks``), ``syntax`` is how ``--ranks`` writes it, ``spec_keys`` the keys of
    an attention spec ({'method': 'mla', 'kv_rank': 8}) that give it, ``short``: ``names[0]`` in tables,
    ``title``: the method in plots ('Tucker').

    convert(layer, setting, *, ignore_rope, **options) -> the new layer (``options``: the names of
        :data:`OPTIONS` it takes; ``ignore_rope``: convert a RoPE layer from its weights at offset 0).
    check(path, layer, setting, value_ranks) -> whether ``setting`` is ``layer``'s full setting; raises
        :class:`SettingError` when ``layer`` (block ``path``) cannot take it.
    plan(layers, *, params=None, kv=None, **how) -> a plan (``.pair``: (setting, value_ranks), as
        one setting or one per layer; ``.table()``) within the budgets; ``plan_options``: the ``how``
        keywords it takes ('query_latent', 'r3'); ``plan_reads_weights``: whether it reads the
        weights (so calibration changes it) or only the structure; ``plan_widths(layers)``: the key
        widths (``r3``) whose plans are measured against each other under a parameter budget
        (None: the one plan). plan None: the method takes no budgets.
    valid(layers) -> the single settings every layer can take, ascending; build(layer, setting) -> the
        target layer (on the current device, e.g. meta) whose size the setting costs
        (:func:`~.budget.converted_cost`, :func:`~.budget.plan_setting`). None: not planned by cost.
    keeps_rope: the source RoPE kinds converted exactly (None: every kind; others are converted with
        ``ignore_rope`` and get the target's own RoPE). shared_latent: one latent holds keys and values
        (calibrated by the block inputs alone). norm_forms: keeps per-head q/k norms (exact forms,
        key heads). levels: the KV steps of a measured per-layer allocation (an object with
        ``setting(pair, level)``, ``fits(layer, pair)``, ``width(pair)``), or None with ``fixed_kv``
        saying why not.
    """

    name: str
    names: tuple[str, ...]
    counts: tuple[int, ...]
    syntax: str
    convert: Callable[..., Attention]
    check: Callable[..., bool]
    plan: Callable[..., Any] | None = None
    plan_options: frozenset = frozenset()
    plan_reads_weights: bool = False
    plan_widths: Callable[..., list] | None = None
    valid: Callable[..., list] | None = None
    build: Callable[..., Attention] | None = None
    options: frozenset = frozenset()
    keeps_rope: tuple[str, ...] | None = ("head",)
    shared_latent: bool = False
    norm_forms: bool = False
    levels: Any = None
    fixed_kv: str = "setting has no KV steps"
    spec_keys: tuple[str, ...] = ()
    short: str | None = None
    title: str = ""

    def keeps(self, rope: str | None) -> bool:
        """Whether a source with ``rope`` keeps it exactly (no RoPE: trivially)."""
        return rope is None or self.keeps_rope is None or rope in self.keeps_rope

    def label(self, setting, value_ranks=None, *, short: bool = False) -> str:
        """'n_kv_heads 2' | 'kv_rank 8, q_rank 4' | 'ranks (2, 8, 8) / (2, 8, 6)'; a list: one per layer."""
        if setting is None:
            return "full rank"
        first = self.short if short and self.short else self.names[0]
        if isinstance(setting, list):
            return f"per-layer {first} ({len(setting)} layers)"
        if not isinstance(setting, (tuple, list)):
            text = f"{first} {setting}"
        elif len(self.names) == 1:
            text = f"{first} {tuple(setting)}"
        else:
            text = ", ".join(f"{name} {value}" for name, value in zip((first, *self.names[1:]), setting))
        return text + (f" / {tuple(value_ranks)}" if value_ranks is not None else "")

    def normal(self, values):
        """A setting given as integers (a tuple / list, or one int) as :func:`convert_layer` takes it:
        one integer alone, several as a tuple (None stays None)."""
        if isinstance(values, (tuple, list)):
            return values[0] if len(values) == 1 else tuple(values)
        return values

    def from_spec(self, spec: dict):
        """The setting an attention spec ({'method': .., 'kv_rank': .., 'q_rank': ..}) gives."""
        values = [spec[key] for key in self.spec_keys if spec.get(key) is not None]
        return self.normal(values[0] if len(values) == 1 else values)

    def given_as(self) -> str:
        """'one int (n_kv_heads)' | 'three ints (r1,r2,r3)': the counts in words, for messages."""
        words = {1: "one int", 2: "two ints", 3: "three ints"}
        return " or ".join(words.get(n, f"{n} ints") for n in self.counts) + f" ({self.syntax})"


_REGISTRY: dict[str, ConversionMethod] = {}


def register(method: ConversionMethod) -> ConversionMethod:
    """Add ``method`` to the registry (a name already taken is refused); returns it."""
    if not isinstance(method, ConversionMethod):
        raise TypeError(f"register takes a ConversionMethod, got {type(method).__name__}")
    if method.name in _REGISTRY:
        raise ValueError(f"a conversion method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> ConversionMethod:
    """Remove the method ``name`` from the registry; returns its record."""
    return _REGISTRY.pop(conversion_method(name).name)


def conversion_method(name: str) -> ConversionMethod:
    """The record of the method ``name``; ValueError naming the registered ones otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method must be one of {list(_REGISTRY)!r}, got {name!r}")
    return _REGISTRY[name]


class MethodNames(Sequence):
    """The registered methods' names, in registration order, read when used (a method registered
    later is in it); ``having``: only those whose record passes it."""

    def __init__(self, having: Callable[[ConversionMethod], bool] | None = None):
        self._having = having

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, m in _REGISTRY.items() if self._having is None or self._having(m))

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


#: Every registered conversion method's name ('tucker', 'gqa', 'mla', then any registered later).
METHODS = MethodNames()
CONVERSIONS = METHODS


def convert_layer(layer: Attention, method: str, setting=None, *, ignore_rope: bool = False, **options) -> Attention:
    """``layer`` converted to ``method`` (a registered name), initialized from its weights.

    Built in: the SVD baselines for 'gqa' / 'mla', truncated HOSVD for 'tucker' (``hosvd='hooi'``:
    refined by ``n_iter`` HOOI sweeps); a RoPE source keeps its RoPE exactly (:mod:`.convert`).
    setting: n_kv_heads (gqa); kv_rank or (kv_rank, q_rank) (mla); ranks (r1, r2, r3) (tucker);
    None: full rank (the source's key heads, else n_heads; MLA kv_rank d_model, or every key pair and value
    direction under RoPE; Tucker (h, d, d), or the exact latent-RoPE form).
    ignore_rope: convert a RoPE layer from its weights at offset 0 (an approximation of its
    position-dependent logits; the result has no RoPE, the caller decides which it gets).
    options (:data:`OPTIONS`): value_ranks (tucker's W_tilde ranks), hosvd, n_iter, nope_fraction (Tucker /
    MLA of a RoPE source: partial RoPE, :func:`.rope.derotated`); one a method does not take is refused.
    """
    record = conversion_method(method)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"convert_layer got unknown options {unknown}; allowed: {list(OPTIONS)}")
    for name, value in options.items():
        if name not in record.options and value != OPTIONS[name]:
            takers = " or ".join(repr(m.name) for m in _REGISTRY.values() if name in m.options)
            raise ValueError(f"{name} is for method={takers}, got method={method!r}")
    taken = {name: value for name, value in options.items() if name in record.options}
    return record.convert(layer, setting, ignore_rope=ignore_rope, **taken)


__all__ = ["CONVERSIONS", "METHODS", "OPTIONS", "ConversionMethod", "MethodNames", "SettingError", "conversion_method",
           "convert_layer", "register", "unregister"]
