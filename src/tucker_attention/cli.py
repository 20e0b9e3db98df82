"""The ``tucker-attn`` command line: argument parsing only, work happens in the library."""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"tucker-attn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
