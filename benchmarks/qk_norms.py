"""What keeping per-head q/k norms costs (:class:`TuckerHeadsAttention`) against linearizing them
(the absorbed Tucker form) at the same ranks and against the source GQA layer, at one Qwen3-0.6B
attention layer's shape (d_model 1024, 16 query heads, 8 key heads of 128, q/k norms, RoPE; random
weights). Both Tucker forms cache r3 + r3~ floats per token; the kept norms cost compute: every
step forms the key heads of every cached position. Times are medians of interleaved blocks in one
run, reported as ratios to the linearized form.

    python benchmarks/qk_norms.py                 # about a minute on 2 CPU cores
    python benchmarks/qk_norms.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import decode_step, format_rows, interleaved_timings  # noqa: E402

from tucker_attention import make_attention  # noqa: E402
from tucker_attention.accounting import attention_param_count, kv_cache_floats_per_token  # noqa: E402
from tucker_attention.layers import frozen_weights  # noqa: E402
from tucker_attention.tensors import to_tucker, to_tucker_heads  # noqa: E402


def layers(args) -> list[tuple[str, torch.nn.Module]]:
    torch.manual_seed(0)
    source = make_attention("gqa", d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads,
                            head_dim=args.head_dim, rope=True, causal=True, qk_norm=True)
    ranks = (args.heads, args.r2, args.r3)
    kept = to_tucker_heads(source).truncated(ranks, ranks)
    absorbed = to_tucker(source.linearized())
    absorbed = absorbed.truncated(ranks, ranks)
    return [("source GQA (q/k norms)", source), ("Tucker, norms kept", kept), ("Tucker, norms linearized", absorbed)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--r2", type=int, default=512, help="query rank of both Tucker forms")
    p.add_argument("--r3", type=int, default=512, help="key (and value) latent: 512 + 512 = 1/2 of the source's KV")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the timed forward (batch 1)")
    p.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096], help="cached tokens of a decode step")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.heads, args.kv_heads, args.head_dim, args.r2, args.r3 = 64, 4, 2, 16, 32, 16
        args.prefill, args.contexts, args.repeats = 32, [64], 2
    args.device, args.dtype = torch.device("cpu"), torch.float32
    built = layers(args)
    x = torch.randn(1, args.prefill, args.d_model)

    def forward(layer):
        return lambda: layer(x)

    results = {label: {"params": attention_param_count(layer), "kv_floats": kv_cache_floats_per_token(layer)}
               for label, layer in built}
    with torch.no_grad():
        timings = interleaved_timings([forward(layer) for _, layer in built], args.device, warmup=1,
                                      repeats=args.repeats)
    for (label, _), timing in zip(built, timings):
        results[label]["prefill_s"] = timing.median
    for context in args.contexts:
        fns = [decode_step(layer, context, args) for _, layer in built]
        with torch.no_grad(), frozen_weights(torch.nn.ModuleList([layer for _, layer in built])):
            timings = interleaved_timings(fns, args.device, warmup=2, repeats=args.repeats)
        for (label, _), timing in zip(built, timings):
            results[label][f"decode_{context}_s"] = timing.median
    base = results["Tucker, norms linearized"]
    columns = ["prefill_s"] + [f"decode_{c}_s" for c in args.contexts]
    head = (["layer", "attention params", "KV floats/token", f"forward {args.prefill} tokens"]
            + [f"decode step at {c}" for c in args.contexts])
    rows = [[label, f"{r['params']:,}", f"{r['kv_floats']:,}"]
            + [f"{r[c] * 1e3:.2f} ms ({r[c] / base[c]:.2f}x)" for c in columns] for label, r in results.items()]
    print(f"d_model {args.d_model}, {args.heads} heads, {args.kv_heads} key heads of {args.head_dim}, ranks "
          f"({args.heads}, {args.r2}, {args.r3}), float32, {torch.get_num_threads()} threads; ratios to the "
          f"linearized form")
    print(format_rows(head, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                        if k not in ("device", "dtype")}, "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
