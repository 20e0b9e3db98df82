"""Rotary position embeddings (RoPE), shared by every layer.

Rotations act on pairs ``(x[j], x[j + D/2])`` (the "rotate-half" layout used by GPT-NeoX and
Hugging Face Llama), with frequency ``base ** (-2j / D)`` for pair ``j``. This is a
permutation of the paper's block-diagonal R(l) (Def. 3.1), so ``R(m) R(n)^T = R(m - n)``
holds and logits depend on positions only through ``m - n``.

Head-dimension RoPE (MHA/GQA) rotates each head's width-``head_dim`` queries and keys;
latent RoPE (Tucker, MLA ``rope='latent'``) rotates the shared width-``r3`` latent.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_even, check_int


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE of width ``dim``.

    ``forward(positions, dtype)`` with ``positions`` a (T,) integer tensor returns
    ``(cos, sin)``, each of shape (T, dim), ready for :func:`apply_rope`; per-sequence
    positions (B, T) give (B, 1, T, dim) tables that broadcast over heads. Angles are computed
    from the positions on the fly (float32, float64 for float64 tables): no table to grow and
    no host-device synchronisation.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = check_even("rope width", check_int("rope width", dim))
        if not base > 1.0:
            raise ValueError(f"rope_base must be > 1, got {base!r}")
        self.base = float(base)
        inv_freq = self.base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)           # (dim/2,), float64

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() not in (1, 2):
            raise ValueError(f"positions must have shape (seq,) or (batch, seq), got shape {tuple(positions.shape)}")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        angles = positions.to(work)[..., None] * self.inv_freq.to(work)          # (..., T, dim/2)
        angles = torch.cat([angles, angles], dim=-1)                             # pair j: columns j, j + dim/2
        if positions.dim() == 2:
            angles = angles.unsqueeze(1)                                         # (B, 1, T, dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x`` (..., T, D) by tables ``cos``/``sin`` of shape (T, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
