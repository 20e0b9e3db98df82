"""Argument validation shared by every public constructor and function.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong type) whose message names the
argument, the value given and the allowed values, so bad input never surfaces as a shape
error from deep inside torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_int(name: str, value, *, low: int = 1, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]``; raise naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer in {allowed}, got {value}")
    return value


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def check_input(x, d_model: int) -> torch.Tensor:
    """Check the layer input ``x`` of shape (B, T, d_model)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (batch, seq, d_model), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape (batch, seq, d_model={d_model}), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("x must hold at least one token (seq >= 1), got seq = 0")
    return x


def resolve_head_dim(d_model: int, n_heads: int, head_dim: int | None) -> int:
    """Per-head width: ``head_dim`` if given, else ``d_model // n_heads`` (which must divide)."""
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (or pass head_dim explicitly)")
        return d_model // n_heads
    return check_int("head_dim", head_dim)
