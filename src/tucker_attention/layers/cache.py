"""What stores a layer's keys and values: one small protocol, and our preallocated cache.

Every layer declares what one token leaves in its cache through ``cache_spec()``: a dict
``name -> (heads, width)``. GQA caches ``k``/``v`` of shape (B, n_kv_heads, S, head_dim); Tucker
caches its latents ``k`` (B, 1, S, r3) and ``v`` (B, 1, S, r3~) (one ``kv`` latent with
``shared_kv``); MLA caches its latent ``kv`` (B, 1, S, kv_rank) (+ the RoPE key with decoupled
RoPE). Entries are stored exactly as the spec says: a shared latent is stored once, before any
RoPE is applied to its key copy.

Anything with the two methods of :class:`CacheProtocol` can serve as ``layer(x, cache=...)``:
:class:`KVCache`, the Hugging Face adapter in ``tucker_attention.hf``, a paged cache.
``Attention.forward`` calls ``check`` before it computes anything and ``append`` once; an
``append`` validates everything before it writes, so on any error the cache is unchanged.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .._checks import check_int


@runtime_checkable
class CacheProtocol(Protocol):
    """The interface ``Attention.forward`` uses to store and read what a layer caches."""

    @property
    def length(self) -> int:
        """Tokens already cached (the new chunk's first slot)."""

    def check(self, spec: dict[str, tuple[int, int]], batch: int, steps: int) -> None:
        """Raise ``ValueError`` if a chunk of ``steps`` tokens of ``batch`` sequences with entries
        ``spec`` cannot be appended. Writes nothing."""

    def append(self, entries: dict[str, torch.Tensor], positions: torch.Tensor):
        """Store ``entries`` {name: (B, heads, T, width)} for positions (T,) and return
        (every cached entry {name: (B, heads, S, width)}, key positions (S,) or (B, S))."""

    # Optional: ``first_key(steps) -> int``, the slot of the first entry ``append`` returns
    # (0 when it returns every cached token; a sliding window drops the oldest). Default 0.


class KVCache:
    """Preallocated tensors for ``max_seq_len`` positions and a fill counter.

    Create through ``layer.make_cache(batch_size, max_seq_len)``; pass as
    ``layer(x_chunk, cache=cache)``, which appends the chunk at the next positions.
    ``positions`` (S,) records the RoPE position each slot was written with.
    """

    def __init__(self, spec: dict[str, tuple[int, int]], batch_size: int, max_seq_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.batch_size = check_int("batch_size", batch_size)
        self.max_seq_len = check_int("max_seq_len", max_seq_len)
        self.spec = dict(spec)
        self.tensors = {name: torch.zeros(batch_size, heads, max_seq_len, width, dtype=dtype, device=device)
                        for name, (heads, width) in spec.items()}
        self.positions = torch.zeros(max_seq_len, dtype=torch.long, device=device)
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the preallocated tensors (all ``max_seq_len`` slots)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached token takes, summed over the batch."""
        return self.nbytes // self.max_seq_len

    def reset(self) -> None:
        """Forget every cached token (the memory stays allocated)."""
        self.length = 0

    def check(self, spec: dict[str, tuple[int, int]], batch: int, steps: int) -> None:
        if dict(spec) != self.spec:
            raise ValueError(f"cache does not fit this layer: it needs {dict(spec)}, got {self.spec}; "
                             f"use layer.make_cache()")
        if batch != self.batch_size:
            raise ValueError(f"x has batch size {batch} but the cache was made for batch_size={self.batch_size}")
        if self.length + steps > self.max_seq_len:
            raise ValueError(
                f"chunk of {steps} tokens overflows the cache: {self.length} cached + {steps} > "
                f"max_seq_len={self.max_seq_len}; make the cache larger or call cache.reset()")

    def append(self, entries: dict[str, torch.Tensor], positions: torch.Tensor):
        """Write ``entries`` (each (B, heads, T, width)) at the next T slots.

        Returns the views of every cached tensor up to the new length and their positions.
        """
        first = next(iter(entries.values()))
        steps = first.shape[2]
        self.check({name: (t.shape[1], t.shape[3]) for name, t in entries.items()}, first.shape[0], steps)
        for name, value in entries.items():
            if value.dtype != self.tensors[name].dtype:
                raise ValueError(f"cache holds {self.tensors[name].dtype} but the layer produced {value.dtype}; "
                                 f"make the cache with dtype={value.dtype}")
        if positions.shape != (steps,):
            raise ValueError(f"a KVCache records one position per slot: positions must have shape ({steps},), "
                             f"got {tuple(positions.shape)}")
        start, end = self.length, self.length + steps
        for name, value in entries.items():
            self.tensors[name][:, :, start:end] = value
        self.positions[start:end] = positions
        self.length = end
        return {name: t[:, :, :end] for name, t in self.tensors.items()}, self.positions[:end]
