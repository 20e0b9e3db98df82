"""Our cache protocol over a Hugging Face ``Cache``, and the RoPE tables shared by a model's blocks.

:class:`HFCache` stores what a layer's ``cache_spec()`` names, and nothing more, in one layer of
the model's cache: two entries (``k``/``v``, e.g. Tucker's r3 and r3~ latents) as the cache's
keys and values; one entry (a shared latent ``kv``, MLA's or shared Tucker's) as its keys with
zero-width values, so the latent is stored once. Caches that grow by concatenation
(``DynamicCache``, the default of ``generate``, and its sliding-window layers) hold any widths;
preallocated caches (static, paged) hold the widths the config declares (see
:func:`tucker_attention.hf.auto.serving_config`).
"""

from __future__ import annotations

import torch

from ...layers import RopeTables


class HFCache:
    """One layer of a transformers ``Cache`` behind :class:`tucker_attention.layers.CacheProtocol`.

    kwargs: the keywords the model passed to the attention block; handed to ``cache.update``
    (paged caches read their indices from them and write into them).
    """

    def __init__(self, cache, layer_idx: int | None, spec: dict[str, tuple[int, int]], kwargs: dict | None = None):
        if len(spec) not in (1, 2):
            raise ValueError(f"a transformers cache holds keys and values: at most two cached entries per layer, "
                             f"got {sorted(spec)}")
        if layer_idx is None:
            raise ValueError("this block has no layer_idx, so it cannot use the model's cache")
        self.cache, self.layer_idx, self.names = cache, layer_idx, list(spec)
        self.kwargs = kwargs if kwargs is not None else {}

    def _layer(self):
        layers = getattr(self.cache, "layers", None)
        return layers[self.layer_idx] if layers is not None and self.layer_idx < len(layers) else None

    @property
    def length(self) -> int:
        """Tokens seen so far (a sliding-window layer keeps only the last ones)."""
        get = getattr(self.cache, "get_seq_length", None)
        return int(get(self.layer_idx)) if callable(get) else 0

    def _stored(self) -> int:
        layer = self._layer()
        keys = getattr(layer, "keys", None)
        return keys.shape[-2] if isinstance(keys, torch.Tensor) and getattr(layer, "is_initialized", True) else 0

    def first_key(self, steps: int) -> int:
        """Position of the first key that appending ``steps`` tokens returns (0 unless a sliding
        window has dropped the oldest ones)."""
        layer = self._layer()
        if layer is None or not getattr(layer, "is_sliding", False):
            return 0
        stored = self._stored()
        if getattr(layer, "record_past", False):
            stored = min(stored, layer.sliding_window - 1)
        return self.length - stored

    def check(self, spec: dict[str, tuple[int, int]], batch: int, steps: int) -> None:
        if list(spec) != self.names:
            raise ValueError(f"cache entries {list(spec)} differ from this adapter's {self.names}")
        if getattr(self.cache, "layers", None) is None:           # a paged cache sized from the config
            self._check_preallocated(spec)
            return
        layer = self._layer()
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            if keys.shape[0] != batch:
                raise ValueError(f"x has batch size {batch} but the cache holds {keys.shape[0]} sequences")
            (name, (heads, width)) = next(iter(spec.items()))
            if tuple(keys.shape[1:2]) + tuple(keys.shape[3:]) != (heads, width):
                raise ValueError(f"the model's cache holds keys of {keys.shape[1]} heads x {keys.shape[3]} but this "
                                 f"layer caches {name!r} of {heads} x {width}; a preallocated cache must be sized "
                                 f"from the converted config (use the default DynamicCache, or a serving layout)")

    def _check_preallocated(self, spec: dict[str, tuple[int, int]]) -> None:
        from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads

        config = getattr(self.cache, "config", None)
        heads, width = (find_num_key_value_heads(config), find_head_dim(config)) if config is not None else (None, None)
        if len(spec) != 2 or {h for h, _ in spec.values()} != {heads} or {w for _, w in spec.values()} != {width}:
            raise ValueError(f"{type(self.cache).__name__} holds keys and values of {heads} heads x {width} (from the "
                             f"config), but this layer caches {spec}; only a serving layout fits a paged cache "
                             f"(Tucker with shared_kv=False and value ranks r3~ = r3, one width for every layer)")

    def append(self, entries: dict[str, torch.Tensor], positions: torch.Tensor):
        first = entries[self.names[0]]
        self.check({n: (t.shape[1], t.shape[3]) for n, t in entries.items()}, first.shape[0], first.shape[2])
        start = self.first_key(first.shape[2])
        second = entries[self.names[1]] if len(self.names) == 2 else first[..., :0]
        keys, values = self.cache.update(first, second, self.layer_idx, self.kwargs)   # 5.0: cache_kwargs
        stored = {self.names[0]: keys} if len(self.names) == 1 else {self.names[0]: keys, self.names[1]: values}
        return stored, torch.arange(start, start + keys.shape[2], device=keys.device)


class SharedRope:
    """Latent-RoPE tables for one model forward, shared by every converted block.

    ``tables(past, steps, first_key, device, position_ids)`` returns one :class:`RopeTables`
    while its arguments stay the same, i.e. for every block of one forward (per sliding /
    global layer type): queries at the model's ``position_ids`` when given (layers that rotate
    keys as they are cached), else at cache slots ``past + arange(T)``; keys at slots
    ``first_key .. past + T``. The tables are a pure function of the arguments (the
    ``position_ids`` tensor is held, so it is not another one with a reused id), so a kept
    one is never stale.
    """

    def __init__(self):
        self._key, self._ids, self._tables = None, None, None

    def tables(self, past: int, steps: int, first_key: int, device: torch.device,
               position_ids: torch.Tensor | None = None) -> RopeTables:
        key = (past, steps, first_key, str(device))
        if key != self._key or position_ids is not self._ids:
            self._key, self._ids = key, position_ids
            queries = (position_ids if position_ids is not None
                       else torch.arange(past, past + steps, device=device))
            if queries.dim() == 2 and queries.shape[0] == 1:
                queries = queries[0]
            self._tables = RopeTables(queries, torch.arange(first_key, past + steps, device=device))
        return self._tables

    def __deepcopy__(self, memo):
        return SharedRope()
