"""Sub-commands on data: prepare-data."""

from __future__ import annotations

import argparse


def prepare_data_command(args: argparse.Namespace) -> int:
    from ..data.prepare import PrepareError, prepare_data

    try:
        meta = prepare_data(args.src, args.tokenizer, args.out, val_fraction=args.val_fraction,
                            text_column=args.text_column, overwrite=args.overwrite, progress=not args.no_progress)
    except PrepareError as err:                           # name the command-line argument
        flag = "SRC" if err.argument == "src" else "--" + err.argument.replace("_", "-")
        raise ValueError(f"{flag}: {err.message}") from None
    sep = meta["separator"]
    sep = f", {sep['token']} (id {sep['id']}) after each document" if sep else ""
    print(f"{args.out}: {meta['tokenizer']['kind']} tokenizer (vocab {meta['vocab_size']:,}, {meta['dtype']}{sep})")
    for split, info in meta["splits"].items():
        print(f"  {split}: {info['tokens']:,} tokens, {info['documents']['count']:,} document(s), "
              f"{len(info['shards'])} shard(s)")
    print(f"  validation: {meta['validation']['rule']}; train with --data {args.out}")
    return 0


def add_prepare_data(sub) -> None:
    """``tucker-attn prepare-data``."""
    d = sub.add_parser("prepare-data", help="tokenize a corpus once into memory-mapped token shards "
                                            "(train --data DIR reads random windows from them)")
    d.add_argument("src", metavar="SRC", help="a text file, a folder of .txt files, or a Hugging Face datasets "
                                              "dataset saved with save_to_disk")
    d.add_argument("--tokenizer", required=True, metavar="TOK",
                   help="char, byte, minilm (the bundled all-MiniLM-L6-v2's) or a local transformers tokenizer "
                        "folder (copied into DIR/tokenizer/)")
    d.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out share, in (0, 1): every round(1/F)-th document (default 0.1)")
    d.add_argument("--text-column", default="text", help="the text column of a datasets dataset (default text)")
    d.add_argument("--overwrite", action="store_true", help="replace an --out that prepare-data wrote before "
                                                            "(written aside, then swapped)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=prepare_data_command)
