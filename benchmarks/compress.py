"""Time and peak memory of ``compress`` on a large MHA layer (no h x d x d tensor is formed).

    python benchmarks/compress.py                       # d_model 4096, 32 heads -> Tucker [32,256,256]
    python benchmarks/compress.py --method hooi --n-iter 2

Peak memory is the growth of the process's maximum resident set while compressing, beside
the size the dense (h, d, d) float32 tensor W alone would take.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tucker_attention import MultiHeadAttention, attention_param_count
from tucker_attention.tensors import compress, relative_error


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--n-heads", type=int, default=32)
    p.add_argument("--ranks", default="32,256,256", help="r1,r2,r3 (also used for the value tensor)")
    p.add_argument("--method", default="hosvd", choices=("hosvd", "hooi"))
    p.add_argument("--n-iter", type=int, default=2)
    args = p.parse_args(argv)
    ranks = tuple(int(r) for r in args.ranks.split(","))

    torch.manual_seed(0)
    layer = MultiHeadAttention(args.d_model, args.n_heads)
    before = max_rss_mb()
    start = time.perf_counter()
    tucker = compress(layer, ranks, method=args.method, n_iter=args.n_iter)
    seconds = time.perf_counter() - start
    growth = max_rss_mb() - before
    dense_mb = args.n_heads * args.d_model ** 2 * 4 / 2 ** 20
    x = torch.randn(1, 64, args.d_model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"MHA d_model={args.d_model} n_heads={args.n_heads} ({attention_param_count(layer):,} params) "
          f"-> Tucker {list(ranks)} ({attention_param_count(tucker):,} params), method {args.method}")
    print(f"compress time: {seconds:.1f} s; peak memory growth: {growth:.0f} MiB "
          f"(the dense float32 W alone: {dense_mb:.0f} MiB)")
    print(f"relative output error on random inputs: {relative_error(layer, tucker, x):.3f}")


if __name__ == "__main__":
    main()
