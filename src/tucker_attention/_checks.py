"""Argument validation shared by every public constructor and function.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong type) whose message names the
argument, the value given and the allowed values, so bad input never surfaces as a shape
error from deep inside torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._fields import Rule, check_value


def check_int(name: str, value, *, low: int = 1, high: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool) in ``[low, high]``; raise naming ``name`` otherwise."""
    return check_value(name, value, int, Rule(low=low, high=high))


def check_ranks(name: str, ranks, highs: Sequence[int]) -> tuple[int, ...]:
    """Validate a rank tuple such as ``ranks=(r1, r2, r3)`` against per-mode maxima."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise TypeError(f"{name} must be a sequence of {len(highs)} ints, got {ranks!r}")
    if len(ranks) != len(highs):
        raise ValueError(f"{name} must have {len(highs)} entries (r1, r2, r3), got {tuple(ranks)!r}")
    return tuple(check_int(f"{name}[{i}] (r{i + 1})", r, high=h) for i, (r, h) in enumerate(zip(ranks, highs)))


def check_even(name: str, value: int) -> int:
    """RoPE rotates pairs of coordinates, so its width must be even."""
    if value % 2:
        raise ValueError(f"{name} must be even for RoPE (it rotates pairs of coordinates), got {value}")
    return value


def check_choice(name: str, value, choices: Sequence) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)!r}, got {value!r}")
    return value


def check_probability(name: str, value: float) -> float:
    return check_value(name, value, float, Rule(low=0, high=1, high_open=True))


def check_input(x, d_model: int) -> torch.Tensor:
    """Check the layer input ``x`` of shape (B, T, d_model)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (batch, seq, d_model), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape (batch, seq, d_model={d_model}), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("x must hold at least one token (seq >= 1), got seq = 0")
    return x


def check_ids(name: str, ids, size: int, *, bound: str, shape: tuple | None = None,
              ignore_minus_one: bool = False) -> None:
    """``ids`` must be an integer tensor (of ``shape``, if given) holding values in ``[0, size)``
    (or -1 with ``ignore_minus_one``). The value check reads the tensor (one ``aminmax``) and is
    skipped while ``torch.compile`` traces (it would break the graph)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    wrong_shape = shape is not None and tuple(ids.shape) != tuple(shape)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex() or wrong_shape:
        want = f" of shape {tuple(shape)}" if shape is not None else ""
        raise ValueError(f"{name} must be an integer tensor{want}, got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < (-1 if ignore_minus_one else 0) or high >= size:
        extra = " or -1 (ignored)" if ignore_minus_one else ""
        raise ValueError(f"{name} must hold values in [0, {bound}={size}){extra}, got min {low}, max {high}")


def resolve_head_dim(d_model: int, n_heads: int, head_dim: int | None) -> int:
    """Per-head width: ``head_dim`` if given, else ``d_model // n_heads`` (which must divide)."""
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (or pass head_dim explicitly)")
        return d_model // n_heads
    return check_int("head_dim", head_dim)
