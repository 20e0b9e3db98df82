"""What benchmarks/serve.py measures: the result rows, the memory-limited batch of (b), the KV-cache
bytes per token of (c), and the models, caches and interleaved timing of decode steps."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from layers import Timing, fill_cache, interleaved_timings

from tucker_attention.layers import KVCache
from tucker_attention.models.gpt import GPT, GPTConfig

GIB = 2 ** 30


@dataclass
class CacheRow:
    """(c): KV-cache bytes per token of one sequence over all layers."""
    label: str
    spec: dict                  # layer 0's cache_spec(): {name: (heads, width)}
    measured: float             # sum of the allocated tensors' nbytes / (batch x capacity)
    from_spec: int              # sum over layers of heads x width x element size


@dataclass
class BatchFit:
    """(b): how many sequences of ``context`` tokens a KV budget holds."""
    batch: int                  # the batch timed: ``fits``, or the cap
    fits: int                   # the largest batch the budget holds
    capped: bool
    note: str = ""


@dataclass
class DecodeRow:
    """One decode step of a whole model for ``batch`` sequences against ``context`` cached tokens."""
    label: str
    context: int
    batch: int
    param_bytes: int            # every parameter once (tied weights once)
    kv_bytes: int               # KV cache read: bytes/token x context x batch
    time: Timing | None = None  # None: not timed (see note)
    note: str = ""
    group: int = 0              # the interleaved group it was timed in

    @property
    def bytes_read(self) -> int:
        return self.param_bytes + self.kv_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.time.median if self.time else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_read": self.bytes_read, "tokens_per_s": self.tokens_per_s,
                "gb_per_s": self.bytes_read / self.time.median / 1e9 if self.time else None}


@dataclass
class BudgetRow:
    label: str
    context: int
    bytes_per_token: float
    fit: BatchFit
    decode: DecodeRow

    def to_dict(self) -> dict:
        return {"label": self.label, "context": self.context, "bytes_per_token": self.bytes_per_token,
                "fit": asdict(self.fit), "decode": self.decode.to_dict()}


@dataclass
class Model:
    label: str
    method: str
    kwargs: dict
    gpt: GPT = field(repr=False)

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.gpt.parameters())

    @property
    def shared(self) -> bool:
        return bool(self.kwargs.get("shared_kv", self.method == "mla"))


# -- pure helpers -------------------------------------------------------------------------------
def gib(n: float) -> str:
    """Bytes in GiB, MiB or KiB (the largest unit they reach), else B."""
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def memory_limited_batch(budget_bytes: float, bytes_per_token: float, context: int,
                         max_batch: int | None = None) -> BatchFit:
    """The largest batch with bytes_per_token x context x batch <= budget_bytes, capped at max_batch.

    A budget below one sequence gives batch 0 with a note saying so; a cap gives ``capped`` and
    a note with the uncapped figure."""
    if not budget_bytes >= 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes!r}")
    if not bytes_per_token > 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token!r}")
    if not (isinstance(context, int) and context >= 1):
        raise ValueError(f"context must be an int >= 1, got {context!r}")
    if max_batch is not None and not (isinstance(max_batch, int) and max_batch >= 1):
        raise ValueError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
    per_sequence = bytes_per_token * context
    fits = int(budget_bytes // per_sequence)
    if fits == 0:
        return BatchFit(0, 0, False, f"the budget ({gib(budget_bytes)}) holds no sequence: one takes "
                                     f"{gib(per_sequence)}")
    if max_batch is not None and fits > max_batch:
        return BatchFit(max_batch, fits, True, f"capped at --max-batch {max_batch} (the budget holds {fits})")
    return BatchFit(fits, fits, False)


def pack_groups(sizes: list[float], limit: float) -> tuple[list[list[int]], list[int]]:
    """Indices of ``sizes`` in consecutive groups (in order) each summing to <= limit, and the
    indices that exceed the limit alone (skipped)."""
    groups: list[list[int]] = []
    skipped, total = [], math.inf
    for i, size in enumerate(sizes):
        if size > limit:
            skipped.append(i)
            continue
        if total + size > limit:
            groups.append([])
            total = 0.0
        groups[-1].append(i)
        total += size
    return groups, skipped


def measured_bytes_per_token(caches: list[KVCache]) -> float:
    """KV bytes per token of one sequence: the caches' tensors' nbytes / (batch x capacity)."""
    held = sum(t.nbytes for cache in caches for t in cache.tensors.values())
    return held / (caches[0].batch_size * caches[0].max_seq_len)


def default_cache_limit(device: torch.device) -> int:
    """Half the available RAM (CPU) or 80 % of the free GPU memory (CUDA), in bytes."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available // 2


# -- building and timing ------------------------------------------------------------------------
def build_models(args: argparse.Namespace) -> list[Model]:
    models = []
    for label, method, kwargs in args.methods:
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=args.vocab_size, block_size=max(args.contexts) + 1, n_layers=args.n_layers,
                           d_model=args.d_model, n_heads=args.n_heads, attention={"method": method, **kwargs})
        gpt = GPT(config).to(device=args.device, dtype=args.dtype).eval()
        models.append(Model(label, method, kwargs, gpt))
    return models


def allocate(model: Model, batch: int, context: int, dtype: torch.dtype) -> list[KVCache]:
    """The model's caches for ``batch`` sequences of ``context`` + 1 tokens, filled to ``context``;
    raises if the bytes they hold differ from what ``cache_spec()`` says."""
    caches = model.gpt.make_caches(batch, context + 1, dtype=dtype)
    measured, spec = measured_bytes_per_token(caches), model.gpt.kv_bytes_per_token(dtype)
    if measured != spec:
        raise RuntimeError(f"{model.label}: the allocated caches hold {measured} B/token, cache_spec() says {spec}")
    for cache in caches:
        fill_cache(cache, context)
    return caches


def cache_rows(models: list[Model], args: argparse.Namespace) -> list[CacheRow]:
    """(c), from caches allocated for 2 sequences of the first context (+1 slot)."""
    rows = []
    for m in models:
        caches = m.gpt.make_caches(2, args.contexts[0] + 1, dtype=args.dtype)
        rows.append(CacheRow(m.label, m.gpt.blocks[0].attn.cache_spec(), measured_bytes_per_token(caches),
                             m.gpt.kv_bytes_per_token(args.dtype)))
        del caches
    return rows


def decode_fn(model: Model, caches: list[KVCache], tokens: torch.Tensor, context: int):
    """One decode step of the whole model against ``context`` cached tokens (rewrites slot ``context``)."""
    def step() -> None:
        for cache in caches:
            cache.length = context
        model.gpt(tokens, caches=caches)
    return step


def time_rows(models: list[Model], rows: list[DecodeRow], args: argparse.Namespace) -> None:
    """Time rows[i] (model i at its batch) in interleaved groups that fit --max-cache-gib; fills
    ``time``, ``group`` and, for what is not timed, ``note``."""
    todo = [i for i, r in enumerate(rows) if r.batch > 0]
    sizes = [rows[i].kv_bytes * (rows[i].context + 1) / max(rows[i].context, 1) for i in todo]
    groups, skipped = pack_groups(sizes, args.max_cache_bytes)
    for i in skipped:
        rows[todo[i]].note = (f"not timed: its caches ({gib(sizes[i])}) exceed --max-cache-gib "
                              f"({gib(args.max_cache_bytes)})")
    for number, group in enumerate(groups):
        members = [todo[i] for i in group]
        fns = []
        for i in members:
            r = rows[i]
            caches = allocate(models[i], r.batch, r.context, args.dtype)
            tokens = torch.randint(args.vocab_size, (r.batch, 1), device=args.device)
            fns.append(decode_fn(models[i], caches, tokens, r.context))
        timings = interleaved_timings(fns, args.device, warmup=args.warmup, repeats=args.repeats,
                                      min_block_s=args.min_block_s)
        for i, timing in zip(members, timings, strict=True):
            rows[i].time, rows[i].group = timing, number
        del fns, caches, tokens                # free this group's caches before the next one allocates
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
