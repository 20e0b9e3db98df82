"""The ``tucker-attn`` command line: argument parsing only, work happens in the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .accounting import PRESETS, attention_table, custom_preset, format_table


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _ranks(text: str) -> tuple[int, int, int]:
    values = _int_list(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three ranks r1,r2,r3, got {text!r}")
    return tuple(values)


def _params(args: argparse.Namespace) -> int:
    custom = [args.d_model, args.n_heads]
    if args.preset and any(v is not None for v in custom):
        raise SystemExit("tucker-attn params: give either --preset or --d-model/--n-heads, not both")
    if args.preset:
        preset = PRESETS[args.preset]
    elif all(v is not None for v in custom):
        preset = custom_preset(args.d_model, args.n_heads, args.n_layers, args.seq_len,
                               n_kv_heads=args.gqa or (), kv_ranks=args.mla or (), tucker_ranks=args.tucker or ())
    else:
        raise SystemExit("tucker-attn params: give --preset {gpt2,llama3-1b} or both --d-model and --n-heads")
    print(f"d_model={preset.d_model} n_heads={preset.n_heads} n_layers={preset.n_layers} "
          f"seq_len={preset.seq_len}, {args.bytes} bytes per scalar, MB = 1e6 bytes, whole model")
    print(format_table(attention_table(preset, bytes_per_scalar=args.bytes)))
    return 0


def _ranks_command(args: argparse.Namespace) -> int:
    from .experiments.ranks import format_rank_table, plot_spectra, rank_report
    from .io import load_attention_layers

    layers = load_attention_layers(args.checkpoint)
    if not layers:
        raise ValueError(f"checkpoint {args.checkpoint!r} holds no attention layers")
    records = rank_report(layers, rtol=args.rtol)
    if any(r["rope"] for r in records):
        print("note: RoPE layers are read at position offset 0 (their weights)")
    print(f"ranks as (heads, row side, column side); numerical: singular values > {args.rtol:g} x largest")
    print(format_rank_table(records))
    path = plot_spectra(records, Path(args.out) / "spectra.png")
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tucker-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="attention parameters and KV cache per method (the paper's Tables 2-3)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a model shape from the paper")
    p.add_argument("--d-model", type=int, help="custom shape: embedding width")
    p.add_argument("--n-heads", type=int, help="custom shape: query heads")
    p.add_argument("--n-layers", type=int, default=1, help="custom shape: attention layers (default 1)")
    p.add_argument("--seq-len", type=int, default=1024, help="custom shape: tokens in the KV cache (default 1024)")
    p.add_argument("--gqa", type=_int_list, help="custom shape: GQA n_kv_heads values, e.g. 4,2")
    p.add_argument("--mla", type=_int_list, help="custom shape: MLA kv_rank values, e.g. 64,128")
    p.add_argument("--tucker", type=_ranks, action="append", help="custom shape: Tucker ranks r1,r2,r3 (repeatable)")
    p.add_argument("--bytes", type=int, default=2, help="bytes per scalar (default 2, bf16)")
    p.set_defaults(func=_params)

    r = sub.add_parser("ranks", help="energy and numerical multilinear ranks of every attention layer in a checkpoint")
    r.add_argument("checkpoint", help="a .safetensors checkpoint written by this package")
    r.add_argument("--out", default=".", help="folder for spectra.png (default: current folder)")
    r.add_argument("--rtol", type=float, default=1e-6, help="numerical rank threshold relative to the largest value")
    r.set_defaults(func=_ranks_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"tucker-attn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
