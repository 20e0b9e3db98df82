"""Training and decoding speed of every attention layer, held against FLOP and bandwidth floors.

Two tables, both relative to MHA and measured in one run:

- training: forward+backward time at GPT-2-small shapes (batch 4, seq 512, d_model 768,
  12 heads, causal), beside the FLOPs of that forward+backward;
- decode: time per generated token at fixed context lengths (batch 1), beside the bytes
  each token reads from the KV cache and the bandwidth that implies (a roofline figure).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``. Its built-in SDPA formulas
only cover the CUDA kernels (the CPU flash kernel counts as zero) and ignore causality, so
every fused SDPA op is counted here by one formula of our own: QK^T and PV take
2*B*H*T*S*(D + Dv) FLOPs, halved for a causal mask, and the backward twice that.

    python benchmarks/layers.py                  # default run, about a minute on 2 CPU cores
    python benchmarks/layers.py --quick          # smoke run, seconds
    python benchmarks/layers.py --device cuda --dtype bfloat16 --backend flash --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tucker_attention import make_attention
from tucker_attention.accounting import attention_param_count, kv_cache_floats_per_token
from tucker_attention.layers import Attention, KVCache, frozen_weights

LAYERS: tuple[tuple[str, str, dict], ...] = (
    ("MHA", "mha", {}),
    ("GQA n_kv=4", "gqa", {"n_kv_heads": 4}),
    ("MQA", "mqa", {}),
    ("MLA d_c=128 q=128", "mla", {"kv_rank": 128, "q_rank": 128}),
    ("Tucker [8,128,64]", "tucker", {"ranks": (8, 128, 64)}),
    ("Tucker [8,128,64] shared", "tucker", {"ranks": (8, 128, 64), "shared_kv": True}),
)
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
Backend = Callable[[], contextlib.AbstractContextManager]  # a fresh sdpa_kernel(...) or nullcontext()
FUSED_SDPA = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


@dataclass
class Timing:
    """Seconds per call: the median over the timed blocks, and every block's value."""
    median: float
    samples: list[float]

    @property
    def spread(self) -> float:
        """Half the min-max range of the blocks, relative to the median."""
        return (max(self.samples) - min(self.samples)) / 2 / self.median


@dataclass
class TrainResult:
    label: str
    params: int
    fwd_flops: int
    flops: int
    time: Timing


@dataclass
class DecodeResult:
    label: str
    context: int
    cache_bytes_per_token: int
    bytes_read: int
    time: Timing


# -- measuring --------------------------------------------------------------------------------
def time_block(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Seconds per call of ``number`` back-to-back calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / number


def interleaved_timings(fns: list[Callable[[], object]], device: torch.device, *, warmup: int, repeats: int,
                        min_block_s: float = 0.05) -> list[Timing]:
    """Time every fn in ``repeats`` blocks of >= min_block_s each, round-robin over the fns.

    Interleaving spreads any slow phase of the machine over all layers instead of one.
    """
    numbers = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        numbers.append(max(1, math.ceil(min_block_s / max(time_block(fn, 1, device), 1e-9))))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, number, out in zip(fns, numbers, samples, strict=True):
            out.append(time_block(fn, number, device))
    return [Timing(statistics.median(s), s) for s in samples]


def sdpa_flop_mapping(causal: bool) -> dict:
    """FlopCounterMode ``custom_mapping`` that counts every fused SDPA kernel, forward and backward."""
    share = 0.5 if causal else 1.0

    def forward(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        (batch, heads, q_len, qk_dim), k_len, v_dim = query_shape, key_shape[-2], value_shape[-1]
        return int(2 * batch * heads * q_len * k_len * (qk_dim + v_dim) * share)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return 2 * forward(query_shape, key_shape, value_shape)

    mapping = {}
    for name in FUSED_SDPA:
        if hasattr(torch.ops.aten, name):
            mapping[getattr(torch.ops.aten, name)] = forward
        if hasattr(torch.ops.aten, name + "_backward"):
            mapping[getattr(torch.ops.aten, name + "_backward")] = backward
    return mapping


def count_flops(fn: Callable[[], object], *, causal: bool) -> int:
    with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping(causal)) as counter:
        fn()
    return counter.get_total_flops()


# -- the two benchmarks -----------------------------------------------------------------------
def build(method: str, kwargs: dict, args: argparse.Namespace) -> Attention:
    layer = make_attention(method, args.d_model, args.n_heads, causal=True, **kwargs)
    return layer.to(device=args.device, dtype=args.dtype)


def training_fns(layer: Attention, args: argparse.Namespace) -> tuple[Callable[[], object], Callable[[], None]]:
    """(forward, forward+backward) on a fresh (batch, seq_len, d_model) input that needs its gradient."""
    x = torch.randn(args.batch, args.seq_len, args.d_model, device=args.device, dtype=args.dtype,
                    requires_grad=True)
    dy = torch.randn_like(x)
    inputs = (x, *layer.parameters())

    def step() -> None:  # .backward, not autograd.grad: FlopCounterMode's module hooks reject the latter
        for tensor in inputs:
            tensor.grad = None
        layer(x).backward(dy)

    return (lambda: layer(x)), step


def run_training(layers: list[tuple[str, Attention]], args: argparse.Namespace, backend: Backend) -> list[TrainResult]:
    fns = [training_fns(layer, args) for _, layer in layers]
    # Counted outside the --backend context: the math kernel would count as its bmm calls.
    flops = [(count_flops(forward, causal=True), count_flops(step, causal=True)) for forward, step in fns]
    with backend():
        timings = interleaved_timings([step for _, step in fns], args.device, warmup=args.warmup,
                                      repeats=args.repeats)
    return [TrainResult(label, attention_param_count(layer), fwd, total, timing)
            for (label, layer), (fwd, total), timing in zip(layers, flops, timings, strict=True)]


def fill_cache(cache: KVCache, context: int) -> None:
    """Random entries in the first ``context`` slots, standing in for an (untimed) prefill.

    The first sequence is drawn from N(0, 1) and copied into the others (the values do not
    change a decode step's cost, and a copy is much faster than drawing every sequence);
    positions 0..context-1 are recorded and ``cache.length`` is set to ``context``.
    """
    for tensor in cache.tensors.values():
        tensor[:1, :, :context].normal_()
        tensor[1:, :, :context] = tensor[:1, :, :context]
    cache.positions[:context] = torch.arange(context, device=cache.positions.device)
    cache.length = context


def decode_step(layer: Attention, context: int, args: argparse.Namespace) -> Callable[[], None]:
    """One decode step against ``context`` cached tokens; each call rewrites the same next slot."""
    cache = layer.make_cache(1, context + 1)
    fill_cache(cache, context)
    x = torch.randn(1, 1, args.d_model, device=args.device, dtype=args.dtype)

    @torch.no_grad()
    def step() -> None:
        cache.length = context
        layer(x, cache=cache)

    return step


def run_decode(layers: list[tuple[str, Attention]], args: argparse.Namespace, backend: Backend) -> list[DecodeResult]:
    """Decode steps as generation runs them: inside ``frozen_weights`` (derived weights formed once),
    unless ``--stateless``."""
    results = []
    for context in args.contexts:
        fns = [decode_step(layer, context, args) for _, layer in layers]
        with backend(), contextlib.ExitStack() as frozen:
            if not args.stateless:
                for _, layer in layers:
                    frozen.enter_context(frozen_weights(layer))
            timings = interleaved_timings(fns, args.device, warmup=args.warmup, repeats=args.repeats)
        for (label, layer), timing in zip(layers, timings, strict=True):
            per_token = kv_cache_floats_per_token(layer) * torch.finfo(args.dtype).bits // 8
            results.append(DecodeResult(label, context, per_token, per_token * context, timing))
    return results


# -- output -----------------------------------------------------------------------------------
def format_rows(head: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others, separated by two spaces."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([fmt(head), "-" * len(fmt(head)), *map(fmt, rows)])


def training_table(results: list[TrainResult]) -> str:
    base = results[0]
    head = ["layer", "params", "GFLOP fwd", "GFLOP f+b", "FLOP ratio", "ms f+b", "±%", "time ratio",
            "time/FLOP", "GFLOP/s"]
    rows = []
    for r in results:
        flop_ratio, time_ratio = r.flops / base.flops, r.time.median / base.time.median
        rows.append([r.label, f"{r.params:,}", f"{r.fwd_flops / 1e9:.2f}", f"{r.flops / 1e9:.2f}",
                     f"{flop_ratio:.3f}", f"{r.time.median * 1e3:.1f}", f"{100 * r.time.spread:.0f}",
                     f"{time_ratio:.3f}", f"{time_ratio / flop_ratio:.2f}",
                     f"{r.flops / r.time.median / 1e9:.1f}"])
    return format_rows(head, rows)


def decode_table(results: list[DecodeResult]) -> str:
    base = {r.context: r.time.median for r in results if r.label == results[0].label}
    head = ["layer", "context", "us/token", "±%", "time ratio", "cache B/token", "MB read/token", "GB/s"]
    rows = [[r.label, str(r.context), f"{r.time.median * 1e6:.1f}", f"{100 * r.time.spread:.0f}",
             f"{r.time.median / base[r.context]:.3f}", f"{r.cache_bytes_per_token:,}",
             f"{r.bytes_read / 1e6:.3f}", f"{r.bytes_read / r.time.median / 1e9:.2f}"]
            for r in results]
    return format_rows(head, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--backend", default="none", choices=("none", *BACKENDS),
                   help="pin SDPA to one kernel (sdpa_kernel) so a silent fallback fails loudly")
    p.add_argument("--batch", type=int, default=4, help="training batch size")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192], help="decode context lengths")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks; the median is reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all results as JSON")
    p.add_argument("--stateless", action="store_true",
                   help="decode without frozen_weights (derived weights recomputed every step)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: batch 1, seq 64, contexts 64 256, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.contexts, args.repeats, args.warmup = 1, 64, [64, 256], 1, 1
    args.device, args.dtype = torch.device(args.device), getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backend = (contextlib.nullcontext if args.backend == "none"
               else lambda: sdpa_kernel(BACKENDS[args.backend]))
    dtype = str(args.dtype).removeprefix("torch.")
    print(f"torch {torch.__version__} | device {args.device} | dtype {dtype} | "
          f"threads {torch.get_num_threads()} | SDPA backend {args.backend} | repeats {args.repeats} (median)")

    layers = [(label, build(method, kwargs, args)) for label, method, kwargs in LAYERS]
    train = run_training(layers, args, backend)
    print(f"\nTraining: forward+backward, batch {args.batch}, seq {args.seq_len}, d_model {args.d_model}, "
          f"{args.n_heads} heads, causal\n(time/FLOP = time ratio / FLOP ratio, 1 = at MHA's FLOP rate; "
          f"±% = half the min-max range of the timed blocks)")
    print(training_table(train))

    decode = run_decode(layers, args, backend)
    print("\nDecode: one token, batch 1, against the context's cached tokens "
          f"({'stateless' if args.stateless else 'inside frozen_weights, as generate runs'}; "
          "GB/s = KV cache bytes read / time per token)")
    print(decode_table(decode))

    if args.json:
        meta = {"torch": torch.__version__, "device": str(args.device), "dtype": dtype,
                "threads": torch.get_num_threads(), "backend": args.backend, "batch": args.batch,
                "seq_len": args.seq_len, "d_model": args.d_model, "n_heads": args.n_heads, "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "training": [asdict(r) for r in train],
                       "decode": [asdict(r) for r in decode]}, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
