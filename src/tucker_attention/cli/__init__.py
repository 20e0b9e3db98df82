"""The ``tucker-attn`` command line: argument parsing only, work happens in the library."""

from __future__ import annotations

import argparse
import sys

from .._extras import explain
from ._types import _int_list, _ranks
from .data_commands import add_prepare_data, prepare_data_command
from .hf_commands import (
    _add_compress,
    _add_convert,
    _add_distill,
    _compress_command,
    _convert_command,
    _convert_ranks,
    _distill_command,
    _share,
)
from .training_commands import (
    _add_compare,
    _add_finetune_compare,
    _add_generate,
    _add_params,
    _add_ranks,
    _add_train,
    _check_prepared_tokenizer,
    _compare_command,
    _data_override,
    _finetune_command,
    _generate_command,
    _params,
    _ranks_command,
    _run_config,
    _train_command,
)

__all__ = ["build_parser", "main",  # the helpers below were this module's before it became a package
           "_int_list", "_ranks", "_params", "_ranks_command", "_run_config", "_check_prepared_tokenizer",
           "_data_override", "_train_command", "_generate_command", "_compare_command", "_finetune_command",
           "_compress_command", "_convert_ranks", "_share", "_convert_command", "_distill_command",
           "_add_distill", "_prepare_data_command", "prepare_data_command"]
_prepare_data_command = prepare_data_command     # its name here before data_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tucker-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_params, _add_ranks, _add_train, _add_generate, _add_compare, _add_finetune_compare,
                _add_compress, _add_convert, _add_distill, add_prepare_data):
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
