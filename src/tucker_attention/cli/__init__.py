"""The ``tucker-attn`` command line: argument parsing only, work happens in the library."""

from __future__ import annotations

import argparse
import sys

from .._extras import explain
from . import hf_commands, training_commands
from .data_commands import add_prepare_data

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tucker-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (training_commands.add_commands, hf_commands.add_commands, add_prepare_data):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (arguments, config, data, files) or a missing extra, 3 a run stopped on a
    non-finite loss, gradient norm or weight (its good checkpoints are kept)."""
    from ..training.guard import NonFiniteError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ImportError as err:                            # an extra this command needs: say which
        print(f"tucker-attn {args.command}: error: {explain(err)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"tucker-attn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"tucker-attn {args.command}: stopped: {err}", file=sys.stderr)
        return 3
