"""A preallocated key/value cache, one per attention layer.

Every layer declares what it caches through ``cache_spec()``: a dict ``name -> (heads,
width)``. GQA caches ``k``/``v`` of shape (B, n_kv_heads, S, head_dim); Tucker caches its
latents ``k`` (B, 1, S, r3) and ``v`` (B, 1, S, r3~) (one ``kv`` latent with ``shared_kv``);
MLA caches its latent ``kv`` (B, 1, S, kv_rank) plus ``k_rope`` with decoupled RoPE.
"""

from __future__ import annotations

import torch

from .._checks import check_int


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

    def append(self, entries: dict[str, torch.Tensor], positions: torch.Tensor):
        """Write ``entries`` (each (B, heads, T, width)) at the next T slots.

        Returns the views of every cached tensor up to the new length and their positions.
        """
        first = next(iter(entries.values()))
        batch, steps = first.shape[0], first.shape[2]
        if batch != self.batch_size:
            raise ValueError(f"x has batch size {batch} but the cache was made for batch_size={self.batch_size}")
        if self.length + steps > self.max_seq_len:
            raise ValueError(
                f"chunk of {steps} tokens overflows the cache: {self.length} cached + {steps} > "
                f"max_seq_len={self.max_seq_len}; make the cache larger or call cache.reset()")
        for name, value in entries.items():
            if value.dtype != self.tensors[name].dtype:
                raise ValueError(f"cache holds {self.tensors[name].dtype} but the layer produced {value.dtype}; "
                                 f"make the cache with dtype={value.dtype}")
        start, end = self.length, self.length + steps
        for name, value in entries.items():
            self.tensors[name][:, :, start:end] = value
        self.positions[start:end] = positions
        self.length = end
        return {name: t[:, :, :end] for name, t in self.tensors.items()}, self.positions[:end]
