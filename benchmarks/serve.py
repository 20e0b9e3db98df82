"""Serving throughput of whole GPT models where the KV cache decides it, every figure as a ratio to MHA.

GPT-2-small models (d_model 768, 12 layers, 12 heads, vocab 50304, RoPE as GPTConfig gives each
method: head-dimension for MHA/GQA, latent for MLA and Tucker) with random weights, in eval mode,
under ``torch.inference_mode`` and inside ``frozen_weights`` (derived weights such as Tucker's head
cores formed once, as ``GPT.generate`` decodes). Methods: MHA, GQA n_kv=4, MLA d_c=128 (q_rank
128, shared latent: MLA's default), Tucker [8,128,64] and Tucker [8,128,64] with a shared latent.
All methods are timed in one run, interleaved (benchmarks/layers.py ``interleaved_timings``):

(a) decode: one step of the whole model (embedding -> every block -> logits over the vocabulary)
    for a batch of sequences against ``context`` cached tokens (``--contexts``, default 4096), for
    each batch size (``--batches``, default 1 4 16 64): ms per step (the per-token latency) and
    aggregate tokens/s = batch / step time;
(b) fixed KV memory: the largest batch whose caches fit ``--kv-budget-gib`` (default 2 GiB) at that
    context (bytes per token x context x batch <= budget, bytes from (c)), capped by
    ``--max-batch`` (default 256; the table says when a cap applied), and its tokens/s; ratios to
    MHA at MHA's own memory-limited batch;
(c) KV-cache bytes per token (one sequence, all layers), measured from the caches allocated (sum of
    their tensors' ``nbytes`` / (batch x capacity)) and checked against every layer's ``cache_spec()``
    (a mismatch stops the run). The cache's position record (8 bytes per slot and layer, shared by the
    batch) is not KV and is not counted.

Beside every timing: the bytes one step reads at least (every parameter once, the tied embedding /
LM head once, + the KV cache at that context x batch), the bandwidth achieved (GB/s = bytes / step
time), the "floor ratio" (those bytes relative to MHA's: what a purely memory-bound step would give
as its time ratio) and, with ``--bandwidth-gbs``, the time that floor takes at that bandwidth and
the fraction of it reached.

The caches are filled directly, not by a prefill forward (at 4k tokens x 12 layers that is slow on a
CPU and is not what is timed): random latents in the first ``context`` slots, positions
0..context-1 (benchmarks/layers.py ``fill_cache``); every timed step resets ``cache.length`` to
``context`` and writes slot ``context`` again. The methods of one timed group hold their caches at
the same time; when they would exceed ``--max-cache-gib`` (default: half the available RAM on a CPU,
80 % of the free GPU memory on CUDA) they are timed in consecutive groups, and a method whose caches
alone exceed it is skipped at that batch (both said below the table).

    python benchmarks/serve.py                    # CPU, float32, context 4096, batches 1 4 16 64
    python benchmarks/serve.py --quick            # tiny smoke run (d_model 64, 2 layers, context 64), seconds
    python benchmarks/serve.py --device cuda --bandwidth-gbs 4800 --json serve.json   # bfloat16 on CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import sys
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from layers import LAYERS, Timing, fill_cache, interleaved_timings  # noqa: E402

from tucker_attention._table import text_table  # noqa: E402
from tucker_attention.layers import KVCache, frozen_weights  # noqa: E402
from tucker_attention.models.gpt import GPT, GPTConfig  # noqa: E402

GIB = 2 ** 30
#: (label, method, layer arguments): benchmarks/layers.py's layers less MQA
METHODS: tuple[tuple[str, str, dict], ...] = tuple(row for row in LAYERS if row[1] != "mqa")
#: the same methods scaled to --quick's d_model 64, 4 heads (head_dim 16)
QUICK_METHODS: tuple[tuple[str, str, dict], ...] = (
    ("MHA", "mha", {}),
    ("GQA n_kv=2", "gqa", {"n_kv_heads": 2}),
    ("MLA d_c=16 q=16", "mla", {"kv_rank": 16, "q_rank": 16}),
    ("Tucker [2,16,8]", "tucker", {"ranks": (2, 16, 8)}),
    ("Tucker [2,16,8] shared", "tucker", {"ranks": (2, 16, 8), "shared_kv": True}),
)


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


def run_decode(models: list[Model], bytes_per_token: list[float], args, out) -> list[DecodeRow]:
    """(a) for every context and batch; each table printed as soon as it is measured."""
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            group = [DecodeRow(m.label, context, batch, m.param_bytes, int(b * context * batch))
                     for m, b in zip(models, bytes_per_token, strict=True)]
            time_rows(models, group, args)
            print(f"\n(a) decode, context {context}, batch {batch}: one step of the whole model (ms/step = per-token "
                  f"latency; tokens/s = batch / step; floor ratio = bytes read relative to MHA's)", file=out)
            print(decode_table(group, args.bandwidth_gbs), file=out, flush=True)
            rows += group
    return rows


def run_budget(models: list[Model], bytes_per_token: list[float], args, out) -> list[BudgetRow]:
    """(b) for every context; each table printed as soon as it is measured."""
    rows = []
    for context in args.contexts:
        fits = [memory_limited_batch(args.kv_budget_gib * GIB, b, context, args.max_batch) for b in bytes_per_token]
        decode = [DecodeRow(m.label, context, f.batch, m.param_bytes, int(b * context * f.batch), note=f.note)
                  for m, b, f in zip(models, bytes_per_token, fits, strict=True)]
        time_rows(models, decode, args)
        group = [BudgetRow(m.label, context, b, f, d)
                 for m, b, f, d in zip(models, bytes_per_token, fits, decode, strict=True)]
        print(f"\n(b) fixed KV memory {gib(args.kv_budget_gib * GIB)}, context {context}: the largest batch each "
              f"method fits (* = capped at --max-batch {args.max_batch}) and its tokens/s; ratio to MHA at MHA's "
              f"batch", file=out)
        print(budget_table(group, args.bandwidth_gbs), file=out, flush=True)
        rows += group
    return rows


# -- output -------------------------------------------------------------------------------------
def ratio(value: float, base: float, digits: int = 3, suffix: str = "") -> str:
    return f"{value / base:.{digits}f}{suffix}" if base else "n/a"


def bandwidth_cells(row: DecodeRow, bandwidth_gbs: float | None) -> list[str]:
    if row.time is None:
        return ["-"] * (3 if bandwidth_gbs else 1)
    achieved = row.bytes_read / row.time.median / 1e9
    cells = [f"{achieved:.1f}"]
    if bandwidth_gbs:
        floor = row.bytes_read / (bandwidth_gbs * 1e9)
        cells += [f"{floor * 1e3:.3f}", f"{100 * achieved / bandwidth_gbs:.0f}%"]
    return cells


def cache_table(rows: list[CacheRow], context: int) -> str:
    base = rows[0].measured
    head = ["method", "cache_spec (layer 0)", "B/token measured", "B/token cache_spec", "ratio",
            f"per sequence @{context}"]
    body = [[r.label, ", ".join(f"{k} {h}x{w}" for k, (h, w) in r.spec.items()), f"{r.measured:,.0f}",
             f"{r.from_spec:,}", ratio(r.measured, base), gib(r.measured * context)] for r in rows]
    return text_table(head, body)


def notes(rows: list[DecodeRow]) -> list[str]:
    lines = [f"  {r.label} @ batch {r.batch}: {r.note}" for r in rows if r.note]
    if len({r.group for r in rows if r.time}) > 1:
        lines.append("  timed in consecutive interleaved groups (--max-cache-gib): ratios across groups are "
                     "not interleaved")
    return lines


def decode_table(rows: list[DecodeRow], bandwidth_gbs: float | None) -> str:
    base = rows[0]
    head = ["method", "batch", "ms/step", "±%", "time ratio", "tokens/s", "tok/s ratio", "MB read/step",
            "floor ratio", "GB/s"] + (["floor ms", "of bw"] if bandwidth_gbs else [])
    body = []
    for r in rows:
        if r.time is None:
            body.append([r.label, str(r.batch), "-", "-", "-", "-", "-", f"{r.bytes_read / 1e6:,.1f}",
                         ratio(r.bytes_read, base.bytes_read), *bandwidth_cells(r, bandwidth_gbs)])
            continue
        t = r.time.median
        body.append([r.label, str(r.batch), f"{t * 1e3:.2f}", f"{100 * r.time.spread:.0f}",
                     ratio(t, base.time.median if base.time else 0), f"{r.tokens_per_s:,.1f}",
                     ratio(r.tokens_per_s, base.tokens_per_s, 2), f"{r.bytes_read / 1e6:,.1f}",
                     ratio(r.bytes_read, base.bytes_read), *bandwidth_cells(r, bandwidth_gbs)])
    return "\n".join([text_table(head, body), *notes(rows)])


def budget_table(rows: list[BudgetRow], bandwidth_gbs: float | None) -> str:
    base = rows[0].decode
    head = ["method", "B/token", "batch", "fits", "ms/step", "tokens/s", "tok/s ratio", "MB read/step",
            "GB/s"] + (["floor ms", "of bw"] if bandwidth_gbs else [])
    body = []
    for r in rows:
        d = r.decode
        timed = d.time is not None
        body.append([r.label, f"{r.bytes_per_token:,.0f}", str(r.fit.batch) + ("*" if r.fit.capped else ""),
                     str(r.fit.fits), f"{d.time.median * 1e3:.2f}" if timed else "-",
                     f"{d.tokens_per_s:,.1f}" if timed else "0", ratio(d.tokens_per_s, base.tokens_per_s, 2),
                     f"{d.bytes_read / 1e6:,.1f}", *bandwidth_cells(d, bandwidth_gbs)])
    return "\n".join([text_table(head, body), *notes([r.decode for r in rows])])


def roles(models: list[Model]) -> dict[str, int]:
    """Indices of the baseline (first row: MHA), the first separate-latent Tucker and the first MLA."""
    found = {"base": 0}
    for i, m in enumerate(models):
        if m.method == "tucker" and not m.shared:
            found.setdefault("tucker", i)
        if m.method == "mla":
            found.setdefault("mla", i)
    return found


def target_lines(models: list[Model], decode: list[DecodeRow], budget: list[BudgetRow]) -> list[str]:
    """The issue's targets (printed, never asserted)."""
    role = roles(models)
    if "tucker" not in role:
        return []
    n, lines = len(models), []
    t, base = role["tucker"], role["base"]
    for c in range(len(budget) // n):
        rows = budget[c * n:(c + 1) * n]
        tok = [r.decode.tokens_per_s for r in rows]
        line = (f"context {rows[0].context}: {rows[t].label} at its memory-limited batch {rows[t].fit.batch}: "
                f"{ratio(tok[t], tok[base], 2, 'x')} MHA's tokens/s at batch {rows[base].fit.batch} (target >= 6)")
        if "mla" in role:
            m = role["mla"]
            line += (f"; {ratio(tok[t], tok[m], 2, 'x')} {rows[m].label}'s at batch {rows[m].fit.batch} "
                     f"({rows[m].bytes_per_token:,.0f} vs {rows[t].bytes_per_token:,.0f} B/token; target >= 1.2)")
        lines.append(line)
    for r in decode:
        if r.batch == 1 and r.label == models[t].label and r.time is not None:
            b = next(x for x in decode if x.batch == 1 and x.context == r.context and x.label == models[base].label)
            if b.time is not None:
                lines.append(f"context {r.context}, batch 1: {r.label} step time "
                             f"{ratio(r.time.median, b.time.median, 3, 'x')} MHA's (target <= 0.15; memory "
                             f"floor ratio {ratio(r.bytes_read, b.bytes_read)})")
    return lines


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="default float32 on a CPU, bfloat16 on CUDA")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="cached tokens (default 4096)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="decode batch sizes (default 1 4 16 64)")
    p.add_argument("--kv-budget-gib", type=float, default=None, help="KV-cache budget of (b) (default 2)")
    p.add_argument("--max-batch", type=int, default=None, help="cap on (b)'s memory-limited batch (default 256)")
    p.add_argument("--max-cache-gib", type=float, default=None,
                   help="cache memory one timed group may hold (default: half the available RAM; CUDA: 80%% of "
                        "the free memory)")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth (GB/s) for the floor time and the fraction reached (default: print "
                        "only the achieved GB/s)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--repeats", type=int, default=5, help="timed blocks; the median is reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-block-s", type=float, default=0.05, help="shortest timed block (s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all results as JSON")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: d_model 64, 2 layers, 4 heads, vocab 256, context 64, batches 1 2, "
                        "KV budget 0.25 MiB, max batch 8, 1 repeat")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.quick:
        args.d_model, args.n_layers, args.n_heads, args.vocab_size = 64, 2, 4, 256
        args.repeats, args.warmup, args.min_block_s = 1, 1, 0.005
        args.methods = QUICK_METHODS
    else:
        args.methods = METHODS
    defaults = {"contexts": [64] if args.quick else [4096], "batches": [1, 2] if args.quick else [1, 4, 16, 64],
                "kv_budget_gib": 2 ** -12 if args.quick else 2.0, "max_batch": 8 if args.quick else 256}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    if min(args.contexts) < 1 or min(args.batches) < 1 or args.max_batch < 1 or args.kv_budget_gib < 0:
        p.error("contexts, batches and --max-batch must be >= 1, --kv-budget-gib >= 0")
    return args


def run(args: argparse.Namespace, out=None) -> dict:
    """Build the models, measure (c), (a) and (b), print the tables (to ``out``, default stdout);
    returns every result."""
    out = out or sys.stdout
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = str(args.dtype).removeprefix("torch.")
    models = build_models(args)       # outside inference_mode: frozen_weights reads the parameters' versions
    with torch.inference_mode(), contextlib.ExitStack() as frozen:
        for m in models:
            frozen.enter_context(frozen_weights(m.gpt))
        args.max_cache_bytes = (args.max_cache_gib * GIB if args.max_cache_gib is not None
                                else default_cache_limit(args.device))
        print(f"torch {torch.__version__} | device {args.device} | dtype {dtype} | threads {torch.get_num_threads()} | "
              f"d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab_size} | "
              f"repeats {args.repeats} (median) | cache limit per timed group {gib(args.max_cache_bytes)}", file=out)
        print("params: " + ", ".join(f"{m.label} {m.gpt.n_params / 1e6:.1f}M" for m in models), file=out)

        caches = cache_rows(models, args)
        print(f"\n(c) KV cache bytes per token, one sequence, all {args.n_layers} layers ({dtype}); measured = "
              f"the allocated tensors' nbytes / (batch x capacity)", file=out)
        print(cache_table(caches, args.contexts[0]), file=out)
        mismatched = [r.label for r in caches if r.measured != r.from_spec]
        if mismatched:
            raise RuntimeError(f"allocated cache bytes differ from cache_spec() for {mismatched}")
        per_token = [r.measured for r in caches]

        decode = run_decode(models, per_token, args, out)
        budget = run_budget(models, per_token, args, out)
        targets = target_lines(models, decode, budget)
        if targets:
            print("\nissue targets (printed, not asserted):\n" + "\n".join("  " + t for t in targets), file=out)
    results = {"meta": {"torch": torch.__version__, "device": str(args.device), "dtype": dtype,
                        "threads": torch.get_num_threads(), "d_model": args.d_model, "n_layers": args.n_layers,
                        "n_heads": args.n_heads, "vocab_size": args.vocab_size, "repeats": args.repeats,
                        "kv_budget_gib": args.kv_budget_gib, "max_batch": args.max_batch,
                        "max_cache_bytes": args.max_cache_bytes, "bandwidth_gbs": args.bandwidth_gbs},
               "cache": [asdict(r) for r in caches], "decode": [r.to_dict() for r in decode],
               "budget": [r.to_dict() for r in budget], "targets": targets}
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
