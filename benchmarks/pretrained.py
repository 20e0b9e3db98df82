"""Right after conversion: a real pretrained decoder converted at every budget, measured on held-out text.

    python benchmarks/pretrained.py                    # SmolLM2-135M-Instruct, ~45 min on 2 CPU cores
    python benchmarks/pretrained.py --quick            # three rows on fewer tokens: a smoke run
    python benchmarks/pretrained.py --model my.gguf --out my.md --json my.json
    python benchmarks/pretrained.py --recover --rows tucker-kv-1/4-p50 mla-kv-1/4 gqa-1   # + distillation
    python benchmarks/pretrained.py --curve RUN/summary.json        # a tucker-attn distill run's curve

Every row is ``tucker-attn convert``'s own pipeline (:func:`tucker_attention.hf.conversion.settings.convert_model`:
the plan, the measured choice of partial RoPE and key width, activation-aware conversion) on one
loaded model and one set of calibration statistics. Calibration: pieces of the built-in
Shakespeare plays outside the held-out plays; every choice is measured on those. Evaluation:
pieces of the held-out plays, never seen before: next-token KL and top-1 agreement against the
original, each model's perplexity, and the KL again on longer pieces (``--long-len``); then the greedy
answer to one chat prompt.

``--recover``: each row is then distilled from the original (:func:`tucker_attention.hf.distillation.distill.distill`,
what ``tucker-attn distill`` runs: per-layer output matching, then end-to-end logit KL) on windows
of its default data (the plays joined by the model's own calibration samples), and measured again
after each phase on the same held-out pieces and kinds of text; the
recovery table (``--recovery-out``) gives the tokens and wall time of each phase, and the PNG
(``--plot``) the held-out perplexity against training tokens (the distillation's own held-out
windows, every ``--eval-interval`` steps).

Rows are written to the JSON as they finish (atomically); a rerun with the same --json resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROWS = [  # (key, label, method, options)
    ("tucker-full", "Tucker, full rank", "tucker", {"ranks": "full"}),
    ("tucker-kv-1/2", "Tucker, 1/2 of the KV", "tucker", {"budget_kv": 0.5}),
    ("mla-kv-1/2", "MLA, 1/2 of the KV", "mla", {"budget_kv": 0.5}),
    ("tucker-kv-1/4", "Tucker, 1/4 of the KV", "tucker", {"budget_kv": 0.25}),
    ("tucker-kv-1/4-p50", "Tucker, 1/4 of the KV and 50 % of the parameters", "tucker",
     {"budget_kv": 0.25, "budget_params": 0.5}),
    ("mla-kv-1/4", "MLA, 1/4 of the KV", "mla", {"budget_kv": 0.25}),
    ("tucker-kv-1/8", "Tucker, 1/8 of the KV", "tucker", {"budget_kv": 0.125}),
    ("mla-kv-1/8", "MLA, 1/8 of the KV", "mla", {"budget_kv": 0.125}),
    ("gqa-1", "GQA, 1 key head (1/3 of the KV)", "gqa", {"ranks": 1}),
    ("tucker-params-25", "Tucker, 25 % of the attention parameters", "tucker", {"budget_params": 0.25}),
    ("tucker-params-10", "Tucker, 10 % of the attention parameters", "tucker", {"budget_params": 0.10}),
]
QUICK = ("tucker-full", "tucker-kv-1/2", "gqa-1")
PROMPT = "What is the capital of France?"
#: A fact, a piece of code, an instruction: the greedy answers reported for every row.
PROMPTS = (PROMPT, "Write a Python function that returns the square of a number.",
           "List three colours of the rainbow.")
#: Seeds of the held-out samples of the model's own text (neither convert's calibration nor its evaluation).
HELD_OUT_SAMPLES_SEED = 2_000_000


def greedy_answer(model, tokenizer, prompt: str = PROMPT, tokens: int = 24) -> str:
    from tucker_attention.hf.conversion.fidelity import greedy_reply

    return greedy_reply(model, tokenizer, prompt, tokens)


def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary sibling, then a rename."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def scores(model, converted, tokenizer, data: dict) -> dict:
    """Held-out KL, top-1 and perplexity (short pieces), KL on the long pieces, the same on every
    other kind of held-out text (``kinds``), the greedy answers."""
    from tucker_attention.hf.conversion.fidelity import fidelity

    short = fidelity(model, converted, data["eval"], "decoder")
    long = fidelity(model, converted, data["long"], "decoder")
    kinds = {}
    for kind, batches in data["kinds"].items():
        r = fidelity(model, converted, batches, "decoder")
        kinds[kind] = {"kl": r["kl"], "top1": r["top1"], "ppl": r["ppl"], "source_ppl": r["source_ppl"]}
    return {"kl": short["kl"], "top1": short["top1"], "ppl": short["ppl"], "source_ppl": short["source_ppl"],
            "kl_long": long["kl"], "top1_long": long["top1"], "kinds": kinds,
            "answer": greedy_answer(converted, tokenizer),
            "answers": [greedy_answer(converted, tokenizer, p) for p in PROMPTS]}


def measure(key: str, label: str, method: str, options: dict, source: dict, data: dict,
            allocation: str = "auto") -> tuple[dict, object]:
    """(the row, the converted model)."""
    from tucker_attention.hf.conversion.fidelity import attention_summary
    from tucker_attention.hf.conversion.settings import convert_model
    from tucker_attention.tensors import conversion_method

    model, tokenizer = source["model"], source["tokenizer"]
    start = time.perf_counter()
    spreads = conversion_method(method).levels is not None and ("budget_kv" in options or "budget_params" in options)
    converted, info = convert_model(model, method, **options, statistics=data["stats"], batches=data["cal"],
                                    kind="decoder", allocation=allocation if spreads else "uniform")
    seconds = time.perf_counter() - start
    summary = attention_summary(converted, torch.float32)
    return ({"key": key, "label": label, "method": method, "options": options, **summary,
             **scores(model, converted, tokenizer, data), "setting": info["label"],
             "nope_fraction": info["nope_fraction"], "choice": info["choice"], "allocation": info["allocation"],
             "seconds": seconds}, converted)


def recover(converted, source: dict, data: dict, config, run_dir: Path) -> dict:
    """Distil ``converted`` from the source: the scores after the per-layer phase and after the
    end-to-end phase (each with the tokens and seconds it took), and the distillation's history."""
    from tucker_attention.hf.distillation.distill import distill

    model, tokenizer = source["model"], source["tokenizer"]
    result = {"config": dataclasses.asdict(config)}
    phases = [("per_layer", dataclasses.replace(config, steps=0))] if config.layer_steps else []
    phases.append(("end_to_end", config))
    for i, (name, cfg) in enumerate(phases):        # the second phase resumes the first's run
        summary = distill(model, converted, data["tokens"], run_dir, cfg, resume=i > 0, overwrite=i == 0)
        done = summary["history"][-1]
        result[name] = {**scores(model, converted, tokenizer, data), "tokens": done["tokens"],
                        "seconds": done["seconds"]}
        result["history"] = summary["history"]
    return result


def markdown(results: dict, meta: dict) -> str:
    src = meta["source"]
    head = ("| setting | attention params | KV bytes/token | next-token KL | top-1 agreement | perplexity | "
            f"KL at {meta['long_len']} tokens | greedy answer | convert time |")
    lines = [head, "|" + "---|" * 9,
             f"| source ({meta['name']}) | {src['attention_params']:,} | {src['kv_bytes_per_token']:,} | 0 | 1.000 | "
             f"{meta['source_ppl']:.2f} | 0 | {meta['source_answer']!r} | |"]
    for row in results.values():
        rope = f"; partial RoPE {row['nope_fraction']:g}" if row["nope_fraction"] else ""
        lines.append(
            f"| {row['label']}: {row['setting']}{rope} | {row['attention_params']:,} "
            f"({row['attention_params'] / src['attention_params']:.3f}x) | {row['kv_bytes_per_token']:,} "
            f"({row['kv_bytes_per_token'] / src['kv_bytes_per_token']:.3f}x) | {row['kl']:.4g} | {row['top1']:.3f} | "
            f"{row['ppl']:.2f} | {row['kl_long']:.4g} | {row['answer']!r} | {row['seconds']:.0f} s |")
    return "\n".join(lines)


def kinds_markdown(results: dict, meta: dict) -> str:
    """Next-token KL / top-1 agreement of every row on every kind of held-out text, and its greedy answers."""
    kinds = list(meta["kinds"])
    head = "| setting | attention params | KV | " + " | ".join(f"{k}: KL / top-1" for k in kinds) + " | answers |"
    lines = [head, "|" + "---|" * (len(kinds) + 4)]
    src = meta["source"]
    for row in results.values():
        cells = [f"{row['kinds'][k]['kl']:.3f} / {row['kinds'][k]['top1']:.3f}" for k in kinds]
        lines.append(f"| {row['label']}: {row['setting']} | {row['attention_params'] / src['attention_params']:.3f}x | "
                     f"{row['kv_bytes_per_token'] / src['kv_bytes_per_token']:.3f}x | " + " | ".join(cells) +
                     f" | {' / '.join(repr(a) for a in row['answers'])} |")
    where = "; ".join(f"{k}: {v}" for k, v in meta["kinds"].items())
    return "\n".join(lines) + (f"\n\nHeld-out text ({meta['kinds_len']} tokens a piece): {where}. Calibration: "
                                f"{meta['data'].split('; evaluation')[0].removeprefix('calibration: ')}.")


def recovery_markdown(results: dict, meta: dict) -> str:
    """Right after conversion, after the per-layer phase, after the end-to-end phase."""
    head = ("| setting | attention params | KV | after | tokens | time | next-token KL | top-1 agreement | "
            f"perplexity | KL at {meta['long_len']} tokens | greedy answer |")
    lines = [head, "|" + "---|" * 11, f"| source ({meta['name']}) | 1.000x | 1.000x | | | | 0 | 1.000 | "
             f"{meta['source_ppl']:.2f} | 0 | {meta['source_answer']!r} |"]
    src = meta["source"]
    for row in results.values():
        rec = row["recovery"]
        stages = [("convert", {**row, "tokens": 0, "seconds": row["seconds"]})]
        stages += [(name.replace("_", "-"), rec[name]) for name in ("per_layer", "end_to_end") if name in rec]
        params = f"{row['attention_params'] / src['attention_params']:.3f}x"
        kv = f"{row['kv_bytes_per_token'] / src['kv_bytes_per_token']:.3f}x"
        for i, (name, r) in enumerate(stages):
            first = [row["label"], params, kv] if i == 0 else ["", "", ""]
            lines.append("| " + " | ".join(first + [
                name, f"{r['tokens']:,}", f"{r['seconds']:.0f} s", f"{r['kl']:.4g}", f"{r['top1']:.3f}",
                f"{r['ppl']:.2f}", f"{r['kl_long']:.4g}", repr(r["answer"])]) + " |")
    return "\n".join(lines)


def plot_recovery(results: dict, meta: dict, path: Path) -> None:
    """Held-out perplexity (the distillation's own windows) against training tokens, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    source = None
    for row in results.values():
        history = row["recovery"]["history"]
        ax.plot([h["tokens"] for h in history], [h["ppl"] for h in history], marker=".", label=row["label"])
        layer_end = [h for h in history if h["phase"] == "per-layer"]
        if layer_end:
            ax.scatter([layer_end[0]["tokens"]], [layer_end[0]["ppl"]], color="black", zorder=3, s=18)
        source = history[0]["source_ppl"]
    if source is not None:
        ax.axhline(source, color="gray", linestyle="--", label="original")
        ax.axhline(1.1 * source, color="gray", linestyle=":", label="original + 10 %")
    ax.set_xlabel("training tokens (per-layer phase, then end-to-end; dots: end of per-layer)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{meta['name']}: recovery by distillation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curve(summaries: list[Path], path: Path) -> None:
    """Held-out KL and perplexity against training tokens of ``tucker-attn distill`` runs (their
    ``summary.json``): what more tokens buy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl, ppl) = plt.subplots(1, 2, figsize=(10, 4))
    for summary in summaries:
        history = json.loads(Path(summary).read_text())["history"]
        tokens = [h["tokens"] for h in history]
        label = Path(summary).parent.name
        kl.plot(tokens, [h["kl"] for h in history], marker=".", label=label)
        ppl.plot(tokens, [h["ppl"] for h in history], marker=".", label=label)
        ppl.axhline(history[0]["source_ppl"], color="gray", linestyle="--", label="original")
    for ax, name in ((kl, "held-out next-token KL"), (ppl, "held-out perplexity")):
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        ax.set_xlabel("training tokens")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="a bundled name, a .gguf file or a model folder")
    p.add_argument("--out", default="docs/pretrained-table.md", help="the markdown table to write")
    p.add_argument("--json", default="pretrained.json", help="results, written row by row (resumed)")
    p.add_argument("--rows", nargs="*", default=None, help=f"row keys (default all): {[r[0] for r in ROWS]}")
    p.add_argument("--quick", action="store_true", help=f"rows {QUICK} on fewer tokens")
    p.add_argument("--long-len", type=int, default=1024, help="tokens of the long evaluation pieces")
    p.add_argument("--model-text", type=float, default=0.5,
                   help="the share of calibration pieces the model samples itself (convert's default 0.5; 0: the "
                        "plays only)")
    p.add_argument("--kinds-len", type=int, default=256, help="tokens of each held-out piece of every kind")
    p.add_argument("--allocation", default="auto", choices=["auto", "measured", "uniform"],
                   help="convert's --allocation for every row (default auto: spread by measured sensitivity)")
    p.add_argument("--recover", action="store_true", help="distil every row from the original (see above)")
    p.add_argument("--layer-steps", type=int, default=100, help="per-layer steps of --recover")
    p.add_argument("--steps", type=int, default=200, help="end-to-end steps of --recover")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step of --recover")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window of --recover")
    p.add_argument("--layer-lr", type=float, default=None, help="peak lr of the per-layer phase")
    p.add_argument("--lr", type=float, default=None, help="peak lr of the end-to-end phase")
    p.add_argument("--eval-interval", type=int, default=25, help="steps between the curve's points")
    p.add_argument("--runs", default="pretrained-runs", help="the distillation run folders of --recover")
    p.add_argument("--recovery-out", default="docs/pretrained-recovery.md", help="the recovery table")
    p.add_argument("--kinds-out", default="docs/pretrained-kinds.md", help="the table per kind of held-out text")
    p.add_argument("--plot", default="docs/pretrained-recovery.png", help="perplexity against tokens")
    p.add_argument("--curve", nargs="*", metavar="SUMMARY",
                   help="only plot these tucker-attn distill runs' summary.json (KL, perplexity against tokens)")
    p.add_argument("--curve-out", default="docs/pretrained-curve.png", help="the PNG of --curve")
    return p.parse_args(argv)


def line_pieces(docs: dict[str, str], n: int, chars: int) -> list[str]:
    """``n`` pieces of consecutive whole lines (about ``chars`` characters each, verbatim: code keeps
    its indentation), spread evenly over the documents."""
    pieces, current = [], ""
    for line in "\n".join(docs.values()).splitlines(keepends=True):
        current += line
        if len(current) >= chars:
            pieces.append(current)
            current = ""
    return pieces[::max(1, len(pieces) // n)][:n]


def held_out_kinds(model, tokenizer, n: int, seq_len: int) -> tuple[dict, dict]:
    """({kind: evaluation batches}, {kind: description}) of held-out text of several kinds: the held-out
    plays, CPython's documentation text, standard-library code, and the model's own samples from
    seeds no calibration uses; ``n`` pieces of at most ``seq_len`` tokens each."""
    from tucker_attention.data.local_text import python_code, python_docs
    from tucker_attention.hf.conversion.fidelity import id_batches, make_inputs, pad_id, token_batches
    from tucker_attention.hf.conversion.model_text import sample_ids

    _, plays, _ = make_inputs(model, tokenizer, None, n_calibration=1, n_eval=n, seq_len=seq_len, model_text=0.0)
    chars = 4 * seq_len
    kinds = {"plays": plays,
             "python docs": token_batches(tokenizer, line_pieces(python_docs(), n, chars), seq_len, 8),
             "python code": token_batches(tokenizer, line_pieces(python_code(), n, chars), seq_len, 8)}
    own = sample_ids(model, tokenizer, n, seq_len, seed=HELD_OUT_SAMPLES_SEED)
    kinds["own samples"] = id_batches(own, pad_id(tokenizer), 8)
    described = {"plays": "the held-out plays", "python docs": "CPython's help() topics (pydoc_data)",
                 "python code": "standard-library modules' source",
                 "own samples": f"the model's answers to its chat prompts, seeds from {HELD_OUT_SAMPLES_SEED:,}"}
    return kinds, described


def load(args) -> tuple[dict, dict, dict]:
    """(the source, its data: calibration, evaluation, long pieces, statistics, distillation tokens; the meta)."""
    from tucker_attention.hf.conversion.calibration import attention_statistics
    from tucker_attention.hf.conversion.fidelity import attention_summary, fidelity, make_inputs
    from tucker_attention.hf.distillation.data import load_data
    from tucker_attention.hf.sources.original import load_source

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = load_source(args.model)
    model, tokenizer = source["model"], source["tokenizer"]
    sizes = {"n_calibration": 16, "n_eval": 8} if args.quick else {}
    kept: dict = {}                                     # the model's own samples, which distill also trains on
    cal, ev, described = make_inputs(model, tokenizer, None, model_text=args.model_text, samples=kept, **sizes)
    _, long, long_described = make_inputs(model, tokenizer, None, n_calibration=1, n_eval=2 if args.quick else 4,
                                          seq_len=args.long_len)
    kinds, kinds_described = held_out_kinds(model, tokenizer, 8 if args.quick else 16, args.kinds_len)
    start = time.perf_counter()
    data = {"cal": cal, "eval": ev, "long": long, "kinds": kinds, "stats": attention_statistics(model, cal),
            "tokens": load_data(None, tokenizer, model.config.vocab_size, samples=kept)}
    print(f"{described}; long pieces: {long_described.split('evaluation: ')[1]}; statistics in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    meta = {"name": args.model, "source": attention_summary(model, torch.float32), "data": described,
            "long": long_described, "long_len": args.long_len, "torch": torch.__version__,
            "model_text": args.model_text, "allocation": args.allocation, "kinds": kinds_described,
            "kinds_len": args.kinds_len,
            "source_kinds": {k: fidelity(model, model, b, "decoder")["ppl"] for k, b in kinds.items()},
            "threads": torch.get_num_threads(), "quick": args.quick,
            "source_ppl": fidelity(model, model, ev, "decoder")["ppl"],
            "source_answer": greedy_answer(model, tokenizer)}
    return source, data, meta


def run_row(key: str, label: str, method: str, options: dict, results: dict, args, distilling, source: dict,
            data: dict, save) -> None:
    """Measure one row (unless done before) and, with --recover, distil it (unless done with these settings)."""
    converted = None
    if key in results:
        print(f"{label}: done before (resumed)", flush=True)
    else:
        row, converted = measure(key, label, method, options, source, data, args.allocation)
        results[key] = row
        save()
        print(f"{label}: {row['setting']}, KL {row['kl']:.4g}, top-1 {row['top1']:.3f}, ppl {row['ppl']:.2f}, "
              f"KL long {row['kl_long']:.4g}, {row['answer']!r} ({row['seconds']:.0f} s)", flush=True)
    if not args.recover or results[key].get("recovery", {}).get("config") == dataclasses.asdict(distilling):
        return
    if converted is None:                          # the same pipeline again (deterministic)
        _, converted = measure(key, label, method, options, source, data, args.allocation)
    runs = Path(args.runs) / key.replace("/", "-")
    results[key]["recovery"] = recovery = recover(converted, source, data, distilling, runs)
    save()
    for phase in ("per_layer", "end_to_end"):
        if phase in recovery:
            r = recovery[phase]
            print(f"{label}, after {phase.replace('_', ' ')}: KL {r['kl']:.4g}, top-1 {r['top1']:.3f}, "
                  f"ppl {r['ppl']:.2f}, KL long {r['kl_long']:.4g}, {r['answer']!r} ({r['tokens']:,} tokens, "
                  f"{r['seconds']:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    from tucker_attention.hf.distillation.distill import DistillConfig

    args = parse_args(argv)
    if args.curve:
        plot_curve([Path(c) for c in args.curve], Path(args.curve_out))
        return
    lrs = {k: v for k, v in (("layer_lr", args.layer_lr), ("lr", args.lr)) if v is not None}
    distilling = DistillConfig(layer_steps=args.layer_steps, steps=args.steps, batch_size=args.batch_size,
                               seq_len=args.seq_len, eval_interval=args.eval_interval,
                               checkpoint_interval=max(args.eval_interval, 50), **lrs)
    source, data, meta = load(args)
    path = Path(args.json)
    saved = json.loads(path.read_text()) if path.exists() else {}
    same = ("quick", "name", "model_text", "kinds_len", "allocation")
    if any(saved.get("meta", {}).get(k) != meta[k] for k in same):
        saved = {}                                         # another run's results: start over
    results = saved.get("results", {})
    wanted = QUICK if args.quick else (args.rows or [r[0] for r in ROWS])
    for key, label, method, options in ROWS:
        if key in wanted:
            run_row(key, label, method, options, results, args, distilling, source, data,
                    lambda: write_json(path, {"meta": meta, "results": results}))
    recovered = {k: results[k] for k, *_ in ROWS if "recovery" in results.get(k, {})}
    if recovered:
        Path(args.recovery_out).write_text(recovery_markdown(recovered, meta) + "\n")
        plot_recovery(recovered, meta, Path(args.plot))
        print(recovery_markdown(recovered, meta))
    done = {k: results[k] for k, *_ in ROWS if k in results}
    kinds = kinds_markdown(done, meta)
    Path(args.kinds_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.kinds_out).write_text(kinds + "\n")
    print(kinds)
    table = markdown(done, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
