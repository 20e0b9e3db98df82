"""One prepared check on one H100/H200-class GPU: SDPA backends, training and serving throughput, decode bandwidth.

Four parts, each bounded (few iterations; timings printed as they come; the wall-clock of every part
and of the whole run at the end; about 2-4 minutes on an H100/H200, under 8 with ``--compile``):

1. SDPA backend per attention layer: a forward+backward of every method at GPT-2-small layer shapes
   (batch 4 x 1024 tokens, d_model 768, 12 heads, causal, each method's RoPE as in a GPT, bf16)
   under ``torch.profiler``; the backend is read from the kernel and op names (flash / efficient /
   cudnn / math, see /work/shared/KERNELS.md). Every method here has equal key and value widths,
   so each should get flash on the GPU (Tucker attends with one shared key/value head through
   ``enable_gqa``); a row that does not says CHECK.
2. Training throughput of the GPT-2-small MHA and Tucker [8,128,64] GPT models (vocab 50304,
   12 layers): tokens/s of one training step = forward + backward + AdamW step (fused on CUDA),
   bf16 autocast over fp32 weights (as ``tucker-attn train`` runs), batch 8 x 1024;
   ``--compile`` runs the forward/backward through ``torch.compile`` (compilation is untimed warmup).
3. Serving: benchmarks/serve.py's tables at a GPU size (bf16, context 4096, batches 1 4 16 64, the
   fixed KV budget of ``--kv-budget-gib``), its floors at the HBM peak below.
4. Decode bandwidth: bytes read per step / step time of part 3's rows against the HBM peak
   (``--peak-gbs``, else the datasheet figure of the detected GPU: H200 4800 GB/s, H100 SXM 3350,
   H100 NVL 3900, H100 PCIe 2000, H800 3350, A100 80GB 2039, A100 40GB 1555); target >= 60 % at
   batch 64 (printed, not asserted).

    python benchmarks/gpu_check.py                  # on the GPU machine
    python benchmarks/gpu_check.py --compile --json gpu.json
    python benchmarks/gpu_check.py --quick          # CPU smoke run at tiny shapes, seconds

Without CUDA and without ``--quick`` it exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import serve  # noqa: E402
from layers import LAYERS, interleaved_timings, training_fns  # noqa: E402

from tucker_attention._table import text_table  # noqa: E402
from tucker_attention.models.blocks import build_attention  # noqa: E402
from tucker_attention.models.gpt import GPT, GPTConfig  # noqa: E402

#: (substring of a lower-cased event name, backend), first match wins: cuDNN's kernels are named
#: e.g. cudnn_generated_fort_native_sdpa_sm90_flash_fprop_..., so cudnn is tried before flash.
BACKEND_RULES: tuple[tuple[str, str], ...] = (
    ("attention_math", "math"),                    # aten::_scaled_dot_product_attention_math
    ("cudnn_attention", "cudnn"), ("cudnnattention", "cudnn"), ("native_sdpa", "cudnn"),
    ("cudnn_generated", "cudnn"),
    ("efficient_attention", "efficient"), ("efficientattention", "efficient"), ("fmha_cutlass", "efficient"),
    ("mem_eff", "efficient"),
    ("flex_attention", "flex"),
    ("fused_attention_overrideable", "overrideable"),
    ("flash", "flash"),                            # aten::_scaled_dot_product_flash_attention[_for_cpu],
)                                                  # pytorch_flash::flash_fwd_kernel, flash_bwd_*
#: HBM bandwidth (GB/s) by device-name fragment, most specific first (NVIDIA datasheets)
PEAK_GBS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h200",), 4800.0), (("h100", "nvl"), 3900.0), (("h100", "pcie"), 2000.0), (("h100",), 3350.0),
    (("h800",), 3350.0), (("a100", "80gb"), 2039.0), (("a100",), 1555.0),
)


def backend_of(name: str) -> str | None:
    """The SDPA backend a profiler event (op, autograd node or kernel name) belongs to, or None."""
    low = name.lower()
    return next((backend for fragment, backend in BACKEND_RULES if fragment in low), None)


def detect_backends(names) -> dict[str, list[str]]:
    """{backend: the distinct event names that show it}, for every SDPA backend among ``names``."""
    found: dict[str, set[str]] = {}
    for name in names:
        backend = backend_of(name)
        if backend is not None:
            found.setdefault(backend, set()).add(name)
    return {backend: sorted(found[backend]) for backend in sorted(found)}


def profiled_names(fn, device: torch.device) -> list[str]:
    """Names of every op, autograd node and device kernel one call of ``fn`` runs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    names = []
    for event in prof.events():
        names.append(event.name)
        names += [kernel.name for kernel in getattr(event, "kernels", [])]
    return names


def peak_bandwidth(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device).lower()
    return next((gbs for fragments, gbs in PEAK_GBS if all(f in name for f in fragments)), None)


def short(name: str, width: int = 60) -> str:
    name = name.removeprefix("void ")
    return name if len(name) <= width else name[:width - 3] + "..."


# -- the parts ----------------------------------------------------------------------------------
def part_backends(args) -> list[dict]:
    ns = SimpleNamespace(batch=args.layer_batch, seq_len=args.layer_seq, d_model=args.d_model, device=args.device,
                         dtype=args.dtype)
    rows, body = [], []
    for label, method, kwargs in args.layer_methods:
        layer = build_attention({"method": method, **kwargs}, args.d_model, args.n_heads, causal=True, rope=True)
        layer = layer.to(device=args.device, dtype=args.dtype)
        _, step = training_fns(layer, ns)
        step()                                                   # warm: kernel selection, allocations
        found = detect_backends(profiled_names(step, args.device))
        expected = args.device.type != "cuda" or set(found) == {"flash"}
        rows.append({"label": label, "backends": found, "as_expected": expected})
        evidence = "; ".join(short(n) for names in found.values() for n in names[:3])
        verdict = "-" if args.device.type != "cuda" else "OK" if expected else "CHECK"
        body.append([label, ", ".join(found) or "none found", verdict, evidence])
        print(f"  {label}: {', '.join(found) or 'none found'}", flush=True)
        del layer, step
    print(text_table(["method", "SDPA backend(s)", "flash only?", "evidence (first names)"], body))
    return rows


def part_training(args) -> list[dict]:
    models, fns = [], []
    for label, method, kwargs in args.train_methods:
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=args.vocab_size, block_size=args.train_seq, n_layers=args.n_layers,
                           d_model=args.d_model, n_heads=args.n_heads, attention={"method": method, **kwargs})
        model = GPT(config).to(args.device).train()
        forward = torch.compile(model) if args.compile else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.type == "cuda")
        idx = torch.randint(args.vocab_size, (args.train_batch, args.train_seq), device=args.device)
        targets = torch.randint(args.vocab_size, (args.train_batch, args.train_seq), device=args.device)
        amp = args.device.type == "cuda"

        def step(forward=forward, optimizer=optimizer, idx=idx, targets=targets, amp=amp) -> None:
            with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=amp):
                _, loss = forward(idx, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        models.append((label, model))
        fns.append(step)
    start = time.perf_counter()
    timings = interleaved_timings(fns, args.device, warmup=args.train_warmup, repeats=args.train_repeats,
                                  min_block_s=args.min_block_s)
    tokens = args.train_batch * args.train_seq
    rows, body = [], []
    for (label, model), timing in zip(models, timings, strict=True):
        rate = tokens / timing.median
        rows.append({"label": label, "params": model.n_params, "time": timing.median, "samples": timing.samples,
                     "tokens_per_s": rate})
        body.append([label, f"{model.n_params / 1e6:.1f}M", f"{timing.median * 1e3:.1f}",
                     f"{100 * timing.spread:.0f}", f"{rate:,.0f}", f"{rate / rows[0]['tokens_per_s']:.2f}"])
    print(f"  timed in {time.perf_counter() - start:.1f} s (warmup{' and compilation' if args.compile else ''} "
          f"included)")
    print(text_table(["model", "params", "ms/step", "±%", "tokens/s", "ratio"], body))
    return rows


def part_serving(args, peak: float | None) -> dict:
    argv = ["--device", str(args.device)] + (["--quick"] if args.quick else [
        "--contexts", "4096", "--batches", *map(str, args.batches), "--repeats", "3",
        "--kv-budget-gib", str(args.kv_budget_gib), "--max-batch", str(args.max_batch)])
    if peak:
        argv += ["--bandwidth-gbs", str(peak)]
    return serve.run(serve.parse_args(argv))


def part_bandwidth(results: dict, peak: float | None, target: float = 0.6) -> list[dict]:
    """Achieved decode bandwidth of serve's rows (bytes read per step / time) against ``peak``."""
    rows = [("a", r) for r in results["decode"]] + [("b", r["decode"]) for r in results["budget"]]
    top = max(r["batch"] for r in results["decode"])
    out, body = [], []
    for part, r in rows:
        if r["gb_per_s"] is None:
            continue
        fraction = r["gb_per_s"] / peak if peak else None
        verdict = "" if fraction is None or part == "b" or r["batch"] != top else (
            "meets" if fraction >= target else "below")
        out.append({"part": part, "label": r["label"], "batch": r["batch"], "context": r["context"],
                    "gb_per_s": r["gb_per_s"], "fraction": fraction, "verdict": verdict})
        body.append([r["label"], f"({part}) {r['batch']}", f"{r['bytes_read'] / 1e6:,.1f}",
                     f"{r['time']['median'] * 1e3:.3f}", f"{r['gb_per_s']:,.1f}",
                     f"{100 * fraction:.1f}%" if fraction is not None else "n/a", verdict])
    print(f"peak: {f'{peak:,.0f} GB/s' if peak else 'unknown (give --peak-gbs)'}; target >= {100 * target:.0f}% "
          f"at batch {top}, part (a)")
    print(text_table(["method", "batch", "MB read/step", "ms/step", "GB/s", "of peak", f"target @{top}"], body))
    return out


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="default cuda (cpu with --quick)")
    p.add_argument("--compile", action="store_true", help="part 2 through torch.compile")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4], choices=(1, 2, 3, 4),
                   help="which parts to run (4 needs 3)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64], help="part 3 decode batches")
    p.add_argument("--kv-budget-gib", type=float, default=2.0, help="part 3's fixed KV budget")
    p.add_argument("--max-batch", type=int, default=256, help="cap on part 3's memory-limited batch")
    p.add_argument("--peak-gbs", type=float, default=None, help="HBM bandwidth (default: by the GPU's name)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every result as JSON")
    p.add_argument("--quick", action="store_true", help="CPU smoke run at tiny shapes (seconds)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    if args.quick:
        args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
        args.d_model, args.n_heads, args.n_layers, args.vocab_size = 64, 4, 2, 256
        args.layer_batch, args.layer_seq, args.train_batch, args.train_seq = 1, 32, 2, 32
        args.layer_methods = serve.QUICK_METHODS
        args.train_methods = (serve.QUICK_METHODS[0], serve.QUICK_METHODS[3])
        args.train_warmup, args.train_repeats, args.min_block_s = 1, 1, 0.005
    else:
        args.dtype = torch.bfloat16
        args.d_model, args.n_heads, args.n_layers, args.vocab_size = 768, 12, 12, 50304
        args.layer_batch, args.layer_seq, args.train_batch, args.train_seq = 4, 1024, 8, 1024
        args.layer_methods = LAYERS
        args.train_methods = (LAYERS[0], next(row for row in LAYERS if row[0] == "Tucker [8,128,64]"))
        args.train_warmup, args.train_repeats, args.min_block_s = 3 if args.compile else 2, 3, 0.2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device is available (torch.cuda.is_available() is False); this check is "
              "for an H100/H200-class GPU. Use --quick for the CPU smoke run.", file=sys.stderr)
        return 2
    begin = time.perf_counter()
    walls, results = {}, {"device": str(args.device), "quick": args.quick}
    if args.device.type == "cuda":
        print(f"{torch.cuda.get_device_name(args.device)} | torch {torch.__version__} | CUDA {torch.version.cuda}")
    else:
        print(f"{args.device} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    peak = peak_bandwidth(args.device, args.peak_gbs)

    def part(number: int, title: str, fn):
        if number not in args.parts:
            return None
        print(f"\n== {number}. {title}", flush=True)
        start = time.perf_counter()
        value = fn()
        walls[number] = time.perf_counter() - start
        print(f"-- part {number}: {walls[number]:.1f} s", flush=True)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        return value

    results["backends"] = part(1, f"SDPA backend per layer: forward+backward, batch {args.layer_batch} x "
                               f"{args.layer_seq}, d_model {args.d_model}, {args.n_heads} heads, "
                               f"{str(args.dtype).removeprefix('torch.')}", lambda: part_backends(args))
    results["training"] = part(2, f"training step (forward + backward + AdamW), batch {args.train_batch} x "
                               f"{args.train_seq}, {'bf16 autocast' if args.device.type == 'cuda' else 'float32'}"
                               f"{', torch.compile' if args.compile else ''}", lambda: part_training(args))
    results["serving"] = part(3, "serving (benchmarks/serve.py)", lambda: part_serving(args, peak))
    if results["serving"] is not None:
        results["bandwidth"] = part(4, "decode bandwidth against the HBM roofline",
                                    lambda: part_bandwidth(results["serving"], peak))
    total = time.perf_counter() - begin
    results["wall_s"] = {"parts": walls, "total": total}
    print("\nwall-clock: " + ", ".join(f"part {k} {v:.1f} s" for k, v in walls.items()) + f"; total {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
