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
import pathlib
import sys
from dataclasses import asdict

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from layers import LAYERS  # noqa: E402
from serve_measure import (  # noqa: E402
    GIB,
    BatchFit,
    BudgetRow,
    CacheRow,
    DecodeRow,
    Model,
    allocate,
    build_models,
    cache_rows,
    decode_fn,
    default_cache_limit,
    gib,
    measured_bytes_per_token,
    memory_limited_batch,
    pack_groups,
    time_rows,
)
from serve_tables import (  # noqa: E402
    bandwidth_cells,
    budget_table,
    cache_table,
    decode_table,
    notes,
    ratio,
    roles,
    target_lines,
)

from tucker_attention.layers import frozen_weights  # noqa: E402

# what tests and benchmarks/gpu_check.py use as serve.<name>: the helpers' names stay importable from here
__all__ = [
    "GIB", "METHODS", "QUICK_METHODS", "BatchFit", "BudgetRow", "CacheRow", "DecodeRow", "Model", "allocate",
    "bandwidth_cells", "budget_table", "build_models", "cache_rows", "cache_table", "decode_fn", "decode_table",
    "default_cache_limit", "gib", "main", "measured_bytes_per_token", "memory_limited_batch", "notes",
    "pack_groups", "parse_args", "ratio", "roles", "run", "run_budget", "run_decode", "target_lines", "time_rows",
]

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


# -- (a) and (b): timed and printed -------------------------------------------------------------
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
