"""Command-line flags generated from a typed config dataclass (:mod:`tucker_attention._fields`): one
``--kebab-name`` flag per field, read by the field's declared type, and ``--config FILE`` (the same
fields in a .json / .toml file, read by :func:`~tucker_attention.training.config.load_config_file`),
the flags given overriding the file. ``convert`` (ConvertConfig) and ``distill`` (DistillConfig) use it."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from .._fields import check_keys, check_value, describe, field_types, parse_text


def _reader(flag: str, annotation, rule) -> Callable[[str], object]:
    """The argparse type of a flag: the text read by the field's type and checked by its rule (an error
    names the flag and what it allows)."""
    def read(text: str):
        try:
            return check_value(flag, parse_text(flag, text, annotation, rule), annotation, rule)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return read


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def flag_of(name: str) -> str:
    """The flag of a field: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls, *, skip=(), parsers: dict | None = None,
                     metavars: dict | None = None, helps: dict | None = None, config_file: bool = True) -> None:
    """Add a flag per field of the typed dataclass ``cls`` (but ``skip``) to ``parser``.

    Help: the field's ``help`` (``typed(help=...)``), else what its type allows and its default. A flag
    left out sets nothing (the config's default, or ``--config``'s value, holds). ``parsers``: {field:
    argparse type} for fields read otherwise (their errors then come from ``cls`` when it is built);
    ``metavars``: {field: metavar} (default ``V``; a field with choices shows them); ``helps``: {field:
    help} made when the parser is (e.g. from a registry). ``config_file``: also ``--config FILE``
    (:func:`config_values` merges it; a required field may then come from either)."""
    parsers, metavars, helps = parsers or {}, metavars or {}, helps or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, (annotation, rule) in field_types(cls).items():
        if name in skip:
            continue
        field, flag = fields[name], flag_of(name)
        help_text = helps.get(name, field.metadata.get("help"))
        required = _required(field)
        if help_text is None:
            default = (field.default if field.default is not dataclasses.MISSING else None
                       if field.default_factory is dataclasses.MISSING else field.default_factory())
            help_text = describe(annotation, rule) + ("" if required else f" (default {default})")
        help_text += " (required, here or in --config)" if required and config_file else ""
        choices = rule.allowed() if annotation is str else None
        metavar = metavars.get(name, "{" + ",".join(choices) + "}" if choices else "V")
        parser.add_argument(flag, dest=name, type=parsers.get(name) or _reader(flag, annotation, rule),
                            metavar=metavar, default=argparse.SUPPRESS, help=help_text,
                            required=required and not config_file)
    if config_file:
        parser.add_argument("--config", metavar="FILE", help="a .json or .toml file of these settings by their field "
                                                             "names (seq_len for --seq-len); flags given override it")


def config_values(args: argparse.Namespace, cls, *, skip=()) -> dict:
    """The fields of ``cls`` given on the command line: ``--config FILE``'s, then the flags given over them.
    A field ``cls`` requires that neither gives is a ValueError naming its flag."""
    values = {}
    if getattr(args, "config", None):
        from ..training.config import load_config_file

        values = load_config_file(args.config)
        check_keys(cls, values, "")
    values.update({name: getattr(args, name) for name in field_types(cls) if name not in skip and hasattr(args, name)})
    for field in dataclasses.fields(cls):
        if _required(field) and field.name not in values:
            raise ValueError(f"give {flag_of(field.name)} (or {field.name} in --config)")
    return values
