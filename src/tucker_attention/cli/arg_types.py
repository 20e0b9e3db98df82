"""Argument types shared by the sub-commands."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def rank_triple(text: str) -> tuple[int, int, int]:
    values = int_list(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three ranks r1,r2,r3, got {text!r}")
    return tuple(values)
