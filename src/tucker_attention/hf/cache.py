"""Our cache protocol over a Hugging Face ``Cache``, and the RoPE tables shared by a model's blocks.

:class:`HFCache` stores what a layer's ``cache_spec()`` names, and nothing more, in one layer of
the model's cache: two entries (``k``/``v``, e.g. Tucker's r3 and r3~ latents) as the cache's
keys and values; one entry (a shared latent ``kv``, MLA's or shared Tucker's) as its keys with
zero-width values, so the latent is stored once. Only caches that grow by concatenation
(``DynamicCache``, the default of ``generate``) can hold widths of our own.
"""

from __future__ import annotations

import torch

from ..layers import RopeTables


class HFCache:
    """One layer of a transformers ``Cache`` behind :class:`tucker_attention.layers.CacheProtocol`."""

    def __init__(self, cache, layer_idx: int | None, spec: dict[str, tuple[int, int]]):
        if len(spec) not in (1, 2):
            raise ValueError(f"a transformers cache holds keys and values: at most two cached entries per layer, "
                             f"got {sorted(spec)}")
        if layer_idx is None:
            raise ValueError("this block has no layer_idx, so it cannot use the model's cache")
        self.cache, self.layer_idx, self.names = cache, layer_idx, list(spec)

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length(self.layer_idx))

    def check(self, spec: dict[str, tuple[int, int]], batch: int, steps: int) -> None:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", [])
        if self.layer_idx < len(layers) and not isinstance(layers[self.layer_idx], DynamicLayer):
            raise ValueError(f"converted attention caches its own latents, which a "
                             f"{type(layers[self.layer_idx]).__name__} cannot hold; use the default DynamicCache "
                             f"(generate(..., cache_implementation='dynamic'))")
        if list(spec) != self.names:
            raise ValueError(f"cache entries {list(spec)} differ from this adapter's {self.names}")
        keys = getattr(layers[self.layer_idx], "keys", None) if self.layer_idx < len(layers) else None
        if isinstance(keys, torch.Tensor) and keys.numel() and keys.shape[0] != batch:
            raise ValueError(f"x has batch size {batch} but the cache holds {keys.shape[0]} sequences")

    def append(self, entries: dict[str, torch.Tensor], positions: torch.Tensor):
        first = entries[self.names[0]]
        self.check({n: (t.shape[1], t.shape[3]) for n, t in entries.items()}, first.shape[0], first.shape[2])
        second = entries[self.names[1]] if len(self.names) == 2 else first[..., :0]
        keys, values = self.cache.update(first, second, self.layer_idx)
        stored = {self.names[0]: keys} if len(self.names) == 1 else {self.names[0]: keys, self.names[1]: values}
        return stored, torch.arange(keys.shape[2], device=keys.device)


class SharedRope:
    """Slot-position RoPE tables for one model forward, shared by every converted block.

    ``tables(past, steps, device)`` returns one :class:`RopeTables` (queries ``past + arange(T)``,
    keys ``arange(past + T)``) while those three stay the same, i.e. for every block of one
    forward; the tables are a pure function of them, so a kept one is never stale.
    """

    def __init__(self):
        self._key, self._tables = None, None

    def tables(self, past: int, steps: int, device: torch.device) -> RopeTables:
        key = (past, steps, str(device))
        if key != self._key:
            self._key = key
            self._tables = RopeTables(torch.arange(past, past + steps, device=device),
                                      torch.arange(past + steps, device=device))
        return self._tables

    def __deepcopy__(self, memo):
        return SharedRope()
