"""The registry of attention families: which structures of attention module we read, in which order.

A :class:`Family` says how a block is recognized (:meth:`Family.matches`, by the names and types of
its parts, never its class name) and how it is read into one of our layers (:meth:`Family.read`).
Each built-in family is one module of this package that registers itself on import; a family
defined anywhere else is one :func:`register` call (or ``with registered(family):``).

Recognition tries the families in registration order and takes the first that matches: the
built-ins are registered (by :mod:`tucker_attention.hf.families`) as ``mla``, ``proj``,
``qkv_proj``, ``neox``, ``gpt2``, ``bert``; a family registered later is tried after them unless
registered ``before=`` one of them (e.g. a ``query``/``key``/``value``/``out`` module, which
``bert``'s test would also match).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ...layers import Attention


class Unsupported(Exception):
    """A module that matches a family in its names but not in what it computes (the message says how)."""


def is_linear(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is an ``nn.Linear``."""
    return isinstance(getattr(module, name, None), nn.Linear)


class Family:
    """One structure of attention module: how its blocks are recognized and read.

    Subclass it, set the attributes, implement :meth:`read` (and :meth:`matches` when ``linears``
    does not identify it), and :func:`register` an instance.
    """

    #: The structure's name: a block's ``kind``, stored in a converted model's config.
    name: str = ""
    #: What a block holds, for messages.
    description: str = ""
    #: The transformers attention classes it is tested on (others with the same parts are read too).
    tested_on: tuple[str, ...] = ()
    #: The ``nn.Linear`` children that identify a block (the default :meth:`matches`).
    linears: tuple[str, ...] = ()
    #: Every child a block may have (nn.Dropout aside): anything else (sinks, gates, relative
    #: positions) is refused, never dropped silently. Default: ``linears``.
    parts: frozenset[str] = frozenset()
    #: Modules outside the block, by path from its parent, that the read layer computes (BERT's
    #: ``output.dense``): a converted model has ``nn.Identity`` there.
    outside_parts: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "parts" not in vars(cls) and cls.linears:
            cls.parts = frozenset(cls.linears)

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` has this structure's parts (cheap: names and types, nothing is read)."""
        return bool(self.linears) and all(is_linear(module, name) for name in self.linears)

    def read(self, module: nn.Module, parent: nn.Module | None) -> tuple[Attention, dict]:
        """(our layer holding a copy of the block's weights, {'model_rope', 'resid_dropout', 'rope_exact'}).

        ``parent``: the module holding the block. Raises :class:`Unsupported` for a block that has
        the parts but computes something our layers do not.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_FAMILIES: dict[str, Family] = {}            # in recognition order


def register(family: Family, *, before: str | None = None) -> Family:
    """Add ``family`` to the registry: tried after those registered before it, or just before the family
    named ``before``. Its name must be new. Returns it."""
    if not isinstance(family, Family) or not family.name:
        raise TypeError(f"register takes a Family instance with a name, got {family!r}")
    if family.name in _FAMILIES:
        raise ValueError(f"an attention family named {family.name!r} is already registered")
    if before is not None and before not in _FAMILIES:
        raise ValueError(f"before={before!r} is not a registered family ({', '.join(_FAMILIES)})")
    items = list(_FAMILIES.items())
    at = len(items) if before is None else list(_FAMILIES).index(before)
    items.insert(at, (family.name, family))
    _FAMILIES.clear()
    _FAMILIES.update(items)
    return family


def unregister(name: str) -> Family:
    """Remove the family ``name`` from the registry; returns it."""
    if name not in _FAMILIES:
        raise ValueError(f"no attention family named {name!r} is registered")
    return _FAMILIES.pop(name)


@contextlib.contextmanager
def registered(family: Family, *, before: str | None = None) -> Iterator[Family]:
    """``family`` registered (:func:`register`) inside the ``with`` block only."""
    register(family, before=before)
    try:
        yield family
    finally:
        unregister(family.name)


def families() -> tuple[Family, ...]:
    """Every registered family, in recognition order."""
    return tuple(_FAMILIES.values())


def family_named(name: str) -> Family:
    """The registered family ``name`` (a block's ``kind``); ValueError when there is none."""
    if name not in _FAMILIES:
        raise ValueError(f"{name!r} is not a registered attention family ({', '.join(_FAMILIES)}); register "
                         f"its Family (tucker_attention.hf.families.registry.register) first")
    return _FAMILIES[name]


def recognize(module: nn.Module) -> Family | None:
    """The first registered family whose parts ``module`` has, or None."""
    return next((family for family in _FAMILIES.values() if family.matches(module)), None)
