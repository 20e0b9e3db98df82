"""Sub-commands on this package's own models: params, ranks, train, generate, compare, finetune-compare."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..accounting import PRESETS, attention_table, custom_preset, format_table
from .arg_types import int_list, rank_triple


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


def _add_params(sub) -> None:
    """``tucker-attn params``."""
    p = sub.add_parser("params", help="attention parameters and KV cache per method (the paper's Tables 2-3)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a model shape from the paper")
    p.add_argument("--d-model", type=int, help="custom shape: embedding width")
    p.add_argument("--n-heads", type=int, help="custom shape: query heads")
    p.add_argument("--n-layers", type=int, default=1, help="custom shape: attention layers (default 1)")
    p.add_argument("--seq-len", type=int, default=1024, help="custom shape: tokens in the KV cache (default 1024)")
    p.add_argument("--gqa", type=int_list, help="custom shape: GQA n_kv_heads values, e.g. 4,2")
    p.add_argument("--mla", type=int_list, help="custom shape: MLA kv_rank values, e.g. 64,128")
    p.add_argument("--tucker", type=rank_triple, action="append",
                   help="custom shape: Tucker ranks r1,r2,r3 (repeatable)")
    p.add_argument("--bytes", type=int, default=2, help="bytes per scalar (default 2, bf16)")
    p.set_defaults(func=_params)


def _ranks_command(args: argparse.Namespace) -> int:
    from ..experiments.ranks import format_rank_table, plot_spectra, rank_report
    from ..io import load_attention_layers

    if (args.checkpoint is None) == (args.hf is None):
        raise ValueError("give either a checkpoint or --hf MODEL (minilm or a local transformers model folder)")
    if args.hf is not None:
        from ..hf import attention_layers, load_model

        layers = attention_layers(load_model(args.hf, with_tokenizer=False)[0])
        print(f"{args.hf}: {len(layers)} attention blocks")
    else:
        from ..training.checkpoint import checkpoint_file

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


def _add_ranks(sub) -> None:
    """``tucker-attn ranks``."""
    r = sub.add_parser("ranks", help="energy and numerical multilinear ranks of every attention layer of a checkpoint "
                                     "or a Hugging Face model")
    r.add_argument("checkpoint", nargs="?", help="a run folder (its newest checkpoint), a checkpoint folder or a "
                                                 ".safetensors checkpoint written by this package")
    r.add_argument("--hf", metavar="MODEL", help="a transformers model instead: minilm (bundled all-MiniLM-L6-v2) "
                                                  "or a local model folder")
    r.add_argument("--out", default=".", help="folder for spectra.png (default: current folder)")
    r.add_argument("--rtol", type=float, default=1e-6, help="numerical rank threshold relative to the largest value")
    r.set_defaults(func=_ranks_command)


def _run_config(args: argparse.Namespace):
    """The run config of ``train``: a run's stored config on --resume, else defaults < --config < --set.
    Every key and value is checked here, before ``train`` touches the run folder."""
    from ..training import RunConfig, apply_overrides, load_config_file
    from ..training.tasks import TASK_TYPES

    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its stored config; --config is not allowed")
        stored = Path(args.run_dir) / "config.json"
        if stored.is_file():
            base = load_config_file(stored)
        else:  # the config its newest intact checkpoint belongs to
            from ..training.checkpoint import latest_checkpoint, verify_checkpoint

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
    from ..data.prepared import is_prepared, read_meta

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
    from ..training import train

    config = _run_config(args)
    summary = train(config, args.run_dir, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # one report per torchrun job
        return 0
    metric = next(k for k in ("val_loss", "val_accuracy") if k in summary)
    print(f"{args.run_dir}: {metric} {summary[metric]:.4f} after {summary['steps']} steps "
          f"(summary.json, metrics.jsonl, checkpoints/)")
    return 0


def _add_train(sub) -> None:
    """``tucker-attn train``."""
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


def _generate_command(args: argparse.Namespace) -> int:
    import torch

    from ..data.text import tokenizer_from_state
    from ..models.gpt import check_sampling
    from ..training.checkpoint import load_trained_model

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


def _add_generate(sub) -> None:
    """``tucker-attn generate``."""
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


def _compare_command(args: argparse.Namespace) -> int:
    from ..experiments import compare

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


def _add_compare(sub) -> None:
    """``tucker-attn compare``."""
    from ..experiments.compare import PRESETS as COMPARE_PRESETS

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


def _finetune_command(args: argparse.Namespace) -> int:
    from ..experiments.finetune import FINETUNE_PRESETS, format_finetune_table, run_finetune_compare

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


def _add_finetune_compare(sub) -> None:
    """``tucker-attn finetune-compare``."""
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


def add_commands(sub) -> None:
    """The sub-commands of our own models: params, ranks, train, generate, compare, finetune-compare."""
    for add in (_add_params, _add_ranks, _add_train, _add_generate, _add_compare, _add_finetune_compare):
        add(sub)
