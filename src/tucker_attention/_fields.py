"""Typed configuration fields: a dataclass field declares its range or choices (:func:`typed`), the
config's ``__post_init__`` checks every field against its annotation (:func:`check_fields`), and a
``--set`` string is parsed by the declared type (:func:`parse_text`).

Strict by design: an int is an int (not a bool, not ``2.0``), a float is a finite int/float, a bool
is ``True``/``False`` (from text only ``true``/``false``). Errors name the field, the value and
what is allowed, e.g. ``train.lr must be a finite float > 0, got 'fast'``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from typing import Any

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_PLURAL = {int: "integers", float: "finite floats", str: "strings", bool: "booleans"}
# the order in which --set text tries the arms of a union: the most specific syntax first
_PARSE_ORDER = {type(None): 0, bool: 1, int: 2, float: 3, tuple: 4, dict: 5, str: 6}


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field allows beyond its type: a numeric range (``low``/``high``, open or closed) or string
    choices (a tuple, or a function giving them now: the names of a registry that grows)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | typing.Callable[[], tuple] | None = None
    says: str | None = None             # what the field allows in words, for messages, instead of describe's

    def allowed(self) -> tuple | None:
        """The string choices as they are now (None: any string)."""
        return self.choices() if callable(self.choices) else self.choices


NO_RULE = Rule()


def typed(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, low=None, high=None,
          low_open: bool = False, high_open: bool = False, choices=None, says: str | None = None,
          help: str | None = None):
    """A dataclass field with its allowed range or choices, checked by :func:`check_fields`; ``says``:
    what it allows in words (:attr:`Rule.says`); ``help``: its command-line help
    (:func:`tucker_attention.cli.config_flags.add_config_flags`)."""
    choices = choices if choices is None or callable(choices) else tuple(choices)
    rule = Rule(low, high, low_open, high_open, choices, says)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rule": rule, "help": help})


@functools.cache
def type_hints(obj) -> dict:
    """Resolved annotations of a class or function (``from __future__ import annotations`` aware)."""
    return typing.get_type_hints(obj)


@functools.cache
def field_types(cls) -> dict[str, tuple[Any, Rule]]:
    """{field name: (annotation, rule)} of a dataclass."""
    hints = type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("rule", NO_RULE)) for f in dataclasses.fields(cls)}


def range_text(low=None, high=None, low_open: bool = False, high_open: bool = False) -> str:
    """``in [0, 1)``, ``> 0``, ``<= 5`` or ``''`` (no bounds)."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _items(annotation, n: int) -> tuple | None:
    """Element annotations of a ``tuple[...]`` annotation for ``n`` items (None if ``n`` does not fit)."""
    args = typing.get_args(annotation) or (Any, ...)
    if len(args) == 2 and args[1] is Ellipsis:
        return (args[0],) * n
    return args if len(args) == n else None


def describe(annotation, rule: Rule = NO_RULE) -> str:
    """What ``annotation`` (with ``rule``) allows, in words: ``an integer >= 1 or None`` (``rule.says`` if set)."""
    if rule.says is not None:
        return rule.says
    bounds = range_text(rule.low, rule.high, rule.low_open, rule.high_open)
    if _is_union(annotation):
        arms = sorted(typing.get_args(annotation), key=lambda a: a is type(None))  # None last
        return _join([describe(a, rule) for a in arms])
    if annotation is type(None):
        return "None"
    if annotation is bool:
        return "true or false"
    if annotation in (int, float):
        return f"{'an integer' if annotation is int else 'a finite float'} {bounds}".rstrip()
    if annotation is str:
        return f"one of {sorted(rule.allowed())!r}" if rule.choices is not None else "a string"
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        variadic = not args or (len(args) == 2 and args[1] is Ellipsis)
        element = args[0] if args else Any
        if element in _PLURAL and (variadic or set(args) == {element}):
            count = "" if variadic else f"{len(args)} "
            return f"a tuple of {count}{_PLURAL[element]} {bounds}".rstrip()
        return "a tuple"
    if annotation is dict or typing.get_origin(annotation) is dict:
        return "a mapping"
    if annotation is Any:
        return "anything"
    return f"a {getattr(annotation, '__name__', annotation)}"


class _Mismatch(Exception):
    """``value`` does not fit; ``type_ok``: its type fits but not its value (ValueError, not TypeError)."""

    def __init__(self, type_ok: bool):
        self.type_ok = type_ok


def _in_range(value, rule: Rule):
    if rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low)):
        raise _Mismatch(True)
    if rule.high is not None and (value > rule.high or (rule.high_open and value == rule.high)):
        raise _Mismatch(True)
    return value


def _convert(value, annotation, rule: Rule):
    """``value`` checked against ``annotation`` and ``rule``, normalized (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    if _is_union(annotation):
        type_ok = False
        for arm in typing.get_args(annotation):
            try:
                return _convert(value, arm, rule)
            except _Mismatch as err:
                type_ok |= err.type_ok
        raise _Mismatch(type_ok)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None:
            return value
        raise _Mismatch(False)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(False)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch(False)
        return _in_range(value, rule)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch(False)
        try:
            value = float(value)
        except OverflowError:  # an int beyond the float range
            raise _Mismatch(True) from None
        if not math.isfinite(value):
            raise _Mismatch(True)
        return _in_range(value, rule)
    if annotation is str:
        if not isinstance(value, str):
            raise _Mismatch(False)
        if rule.choices is not None and value not in rule.allowed():
            raise _Mismatch(True)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(False)
        items = _items(annotation, len(value))
        if items is None:
            raise _Mismatch(True)
        return tuple(_convert(v, a, rule) for v, a in zip(value, items))
    if isinstance(origin or annotation, type):
        if isinstance(value, origin or annotation):
            return value
        raise _Mismatch(False)
    return value  # an annotation this checker does not know (a Protocol, a Callable): not checked


def check_value(name: str, value, annotation, rule: Rule = NO_RULE):
    """``value`` if it fits ``annotation`` and ``rule`` (ints become floats for a float); raises
    TypeError (wrong type) or ValueError (out of range, not a choice) naming ``name``."""
    try:
        return _convert(value, annotation, rule)
    except _Mismatch as err:
        raise (ValueError if err.type_ok else TypeError)(
            f"{name} must be {describe(annotation, rule)}, got {value!r}") from None


def check_fields(obj, prefix: str = "") -> None:
    """Check (and normalize) every field of the dataclass ``obj``; names read ``prefix.field``."""
    for name, (annotation, rule) in field_types(type(obj)).items():
        setattr(obj, name, check_value(f"{prefix}.{name}" if prefix else name, getattr(obj, name), annotation, rule))


def check_keys(cls, mapping, prefix: str = "") -> None:
    """``mapping`` must be a dict whose keys are fields of the dataclass ``cls``."""
    if not isinstance(mapping, dict):
        raise TypeError(f"{prefix or 'config'} must be a mapping, got {mapping!r}")
    names = list(field_types(cls))
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        dot = f"{prefix}." if prefix else ""
        raise ValueError(f"unknown config key(s) {[dot + k for k in unknown]}; allowed: {[dot + n for n in names]}")


def check_values(cls, mapping, prefix: str = "") -> dict:
    """The given keys of ``mapping`` (a partial ``cls``) checked by their fields' types and rules."""
    check_keys(cls, mapping, prefix)
    types_ = field_types(cls)
    return {k: check_value(f"{prefix}.{k}" if prefix else k, v, *types_[k]) for k, v in mapping.items()}


class _NoParse(Exception):
    pass


def _parse(key: str, text: str, annotation):
    """``text`` read as ``annotation`` (no range checks); raises _NoParse."""
    stripped = text.strip()
    if _is_union(annotation):
        for arm in sorted(typing.get_args(annotation), key=lambda a: _PARSE_ORDER.get(typing.get_origin(a) or a, 7)):
            try:
                return _parse(key, text, arm)
            except _NoParse:
                pass
        raise _NoParse
    if annotation is type(None) and stripped.lower() in ("null", "none"):
        return None
    if annotation is bool and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if annotation is int and _INT.fullmatch(stripped):
        return int(stripped)
    if annotation is float and _FLOAT.fullmatch(stripped):
        return float(stripped)
    if annotation is str:
        return text
    if typing.get_origin(annotation) is tuple:
        inner = stripped[1:-1] if stripped[:1] == "[" and stripped[-1:] == "]" else stripped
        parts = inner.split(",") if inner.strip() else []
        items = _items(annotation, len(parts))
        if items is None:
            raise _NoParse
        return tuple(_parse(key, p, a) for p, a in zip(parts, items))
    if (annotation is dict or typing.get_origin(annotation) is dict) and stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"{key}: {text!r} is not a valid JSON object ({err})") from None
        if isinstance(value, dict):
            return value
    if annotation is Any:  # an argument without annotation: JSON if it reads as JSON, else the text
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    raise _NoParse


def parse_text(key: str, text: str, annotation, rule: Rule = NO_RULE):
    """The ``--set key=text`` value read as ``annotation``: bool ``true``/``false``; int an integer
    literal; float a float literal; None ``null``/``none``; a tuple ``4,32,16`` or ``[4,32,16]``;
    a dict a JSON object (text starting with ``{``); str the text. Unions try None, bool, int,
    float, tuple, dict, str in that order. Ranges are checked when the config is built."""
    try:
        return _parse(key, text, annotation)
    except _NoParse:
        raise ValueError(f"{key} must be {describe(annotation, rule)}, got {text!r}") from None
