"""Rotary position embeddings (RoPE), shared by every layer.

Rotations act on pairs ``(x[j], x[j + D/2])`` (the "rotate-half" layout used by GPT-NeoX and
Hugging Face Llama), with frequency ``base ** (-2j / D)`` for pair ``j``. This is a
permutation of the paper's block-diagonal R(l) (Def. 3.1), so ``R(m) R(n)^T = R(m - n)``
holds and logits depend on positions only through ``m - n``.

Head-dimension RoPE (MHA/GQA, ``rope='head'``) rotates each head's width-``head_dim``
queries and keys; latent RoPE (Tucker, MLA ``rope='latent'``) rotates the shared width-``r3``
latent. :class:`RopeTables` holds the cos/sin tables of one model forward, so a model
computes them once and every layer reads them.
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

    ``inv_freq`` (dim/2,) replaces the default frequencies ``base ** (-2j / dim)`` (e.g. a
    Hugging Face model's scaled RoPE). :attr:`signature` identifies the frequencies, so
    layers with equal ones share one table in :class:`RopeTables`.
    """

    def __init__(self, dim: int, base: float = 10000.0, *, inv_freq: torch.Tensor | None = None):
        super().__init__()
        self.dim = check_even("rope width", check_int("rope width", dim))
        if not base > 1.0:
            raise ValueError(f"rope_base must be > 1, got {base!r}")
        self.base = float(base)
        self.signature: tuple = (self.dim, self.base)
        self._on_device: dict[str, torch.Tensor] = {}
        if inv_freq is not None:
            self.set_frequencies(inv_freq)

    @property
    def inv_freq(self) -> torch.Tensor:
        """(dim/2,) float64 inverse frequencies. Not a buffer: a pure function of :attr:`signature`,
        so no dtype cast, device move or meta-device loader can leave it stale or empty."""
        return self._compute(torch.device("cpu"), torch.float64)

    def _compute(self, device: torch.device, work: torch.dtype) -> torch.Tensor:
        if len(self.signature) == 3:
            return torch.tensor(self.signature[2], dtype=torch.float64, device=device).to(work)
        steps = torch.arange(0, self.dim, 2, dtype=torch.float64, device=device)
        return (self.base ** (-steps / self.dim)).to(work)

    def set_frequencies(self, inv_freq: torch.Tensor) -> None:
        """Use these (dim/2,) inverse frequencies instead of the default ones."""
        if isinstance(inv_freq, torch.Tensor):
            inv_freq = inv_freq.detach().cpu()
        values = torch.as_tensor(inv_freq, dtype=torch.float64, device="cpu")   # also under a meta device
        if values.shape != (self.dim // 2,) or not torch.isfinite(values).all():
            raise ValueError(f"inv_freq must be a finite tensor of shape (dim/2,) = ({self.dim // 2},), "
                             f"got shape {tuple(values.shape)}")
        self.signature = (self.dim, self.base, tuple(values.tolist()))
        self._on_device = {}

    def _frequencies(self, device: torch.device, work: torch.dtype) -> torch.Tensor:
        """The frequencies on ``device`` in ``work``, kept per (device, dtype): a pure function of
        the signature, so a kept one is never stale (computed in the graph under torch.compile)."""
        if torch.compiler.is_compiling():
            return self._compute(device, work)
        key = f"{device}/{work}"
        if key not in self._on_device:
            self._on_device[key] = self._compute(device, work)
        return self._on_device[key]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() not in (1, 2):
            raise ValueError(f"positions must have shape (seq,) or (batch, seq), got shape {tuple(positions.shape)}")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        angles = positions.to(work)[..., None] * self._frequencies(positions.device, work)  # (..., T, dim/2)
        angles = torch.cat([angles, angles], dim=-1)                             # pair j: columns j, j + dim/2
        if positions.dim() == 2:
            angles = angles.unsqueeze(1)                                         # (B, 1, T, dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x`` (..., T, D) by tables ``cos``/``sin`` of shape (T, D)."""
    # x * cos + cat(-x2, x1) * sin, written into one new tensor: the shared latent's keys are
    # rotated on every decode step over the whole cache, where each temporary is a full pass
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos
    out[..., :half].addcmul_(x2, sin[..., :half], value=-1)
    out[..., half:].addcmul_(x1, sin[..., half:])
    return out


class RopeTables:
    """The RoPE tables of one forward: queries at ``positions``, keys at ``key_positions``.

    positions: (T,) or (B, T) integer positions of the new tokens.
    key_positions: (S,) or (B, S) positions of every key they attend to (cached + new);
        default ``positions`` (no cache).
    given: (cos, sin) query tables computed elsewhere (a Hugging Face model's own RoPE),
        used as they are by head-dimension RoPE.

    A model builds one per forward and passes it to every layer (``layer(x, rope=tables)``).
    Each table is computed on first request and kept for the other layers asking with an
    equal :attr:`RotaryEmbedding.signature` and dtype: it is a pure function of that key and
    the positions this object was made with, so a kept table is never stale.
    """

    def __init__(self, positions: torch.Tensor | None, key_positions: torch.Tensor | None = None, *,
                 given: tuple[torch.Tensor, torch.Tensor] | None = None):
        if positions is None and given is None:
            raise ValueError("RopeTables needs positions or given tables")
        self.positions = positions
        self.key_positions = positions if key_positions is None else key_positions
        self.given = given
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def n_keys(self) -> int | None:
        return None if self.key_positions is None else self.key_positions.shape[-1]

    def _get(self, which: str, rotary: RotaryEmbedding, dtype: torch.dtype):
        key = (which, rotary.signature, dtype)
        if key not in self._tables:
            positions = self.positions if which == "query" else self.key_positions
            if positions is None:
                raise ValueError("these RoPE tables were given for the queries only; this layer also needs "
                                 "key positions (build RopeTables(positions, key_positions))")
            self._tables[key] = rotary(positions, dtype)
        return self._tables[key]

    def query(self, rotary: RotaryEmbedding, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) at the query positions, (T, D) or (B, 1, T, D)."""
        if self.given is not None:
            return tuple(t.to(dtype) for t in self.given)
        return self._get("query", rotary, dtype)

    def key(self, rotary: RotaryEmbedding, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) at the key positions, (S, D) or (B, 1, S, D)."""
        return self._get("key", rotary, dtype)
