"""Right after conversion: a real pretrained decoder converted at every budget, measured on held-out text.

    python benchmarks/pretrained.py                    # SmolLM2-135M-Instruct, ~45 min on 2 CPU cores
    python benchmarks/pretrained.py --quick            # three rows on fewer tokens: a smoke run
    python benchmarks/pretrained.py --model my.gguf --out my.md --json my.json

Every row is ``tucker-attn convert``'s own pipeline (:func:`tucker_attention.hf.pipeline.convert_model`:
the plan, the measured choice of partial RoPE and key width, activation-aware conversion) on one
loaded model and one set of calibration statistics. Calibration: pieces of the built-in
Shakespeare plays outside the held-out plays; every choice is measured on those. Evaluation:
pieces of the held-out plays, never seen before: next-token KL and top-1 agreement against the
original, each model's perplexity, and the KL again on longer pieces (where partial RoPE, chosen
on short pieces, would show); then the greedy answer to one chat prompt.

Rows are written to the JSON as they finish (atomically); a rerun with the same --json resumes.
"""

from __future__ import annotations

import argparse
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
    ("mla-kv-1/4", "MLA, 1/4 of the KV", "mla", {"budget_kv": 0.25}),
    ("tucker-kv-1/8", "Tucker, 1/8 of the KV", "tucker", {"budget_kv": 0.125}),
    ("mla-kv-1/8", "MLA, 1/8 of the KV", "mla", {"budget_kv": 0.125}),
    ("gqa-1", "GQA, 1 key head (1/3 of the KV)", "gqa", {"ranks": 1}),
    ("tucker-params-25", "Tucker, 25 % of the attention parameters", "tucker", {"budget_params": 0.25}),
    ("tucker-params-10", "Tucker, 10 % of the attention parameters", "tucker", {"budget_params": 0.10}),
]
QUICK = ("tucker-full", "tucker-kv-1/2", "gqa-1")
PROMPT = "What is the capital of France?"


def greedy_answer(model, tokenizer, prompt: str = PROMPT, tokens: int = 24) -> str:
    """The model's greedy reply to ``prompt`` (its chat template when it has one), special tokens dropped."""
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary sibling, then a rename."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def measure(key: str, label: str, method: str, options: dict, source: dict, data: dict) -> dict:
    from tucker_attention.hf.pipeline import convert_model
    from tucker_attention.hf.source import attention_summary, fidelity

    model, tokenizer = source["model"], source["tokenizer"]
    start = time.perf_counter()
    converted, info = convert_model(model, method, **options, statistics=data["stats"], batches=data["cal"],
                                    kind="decoder")
    seconds = time.perf_counter() - start
    short = fidelity(model, converted, data["eval"], "decoder")
    long = fidelity(model, converted, data["long"], "decoder")
    summary = attention_summary(converted, torch.float32)
    return {"key": key, "label": label, "method": method, "options": options, **summary,
            "kl": short["kl"], "top1": short["top1"], "ppl": short["ppl"], "source_ppl": short["source_ppl"],
            "kl_long": long["kl"], "top1_long": long["top1"], "answer": greedy_answer(converted, tokenizer),
            "setting": info["label"], "nope_fraction": info["nope_fraction"], "choice": info["choice"],
            "seconds": seconds}


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="a bundled name, a .gguf file or a model folder")
    p.add_argument("--out", default="docs/pretrained-table.md", help="the markdown table to write")
    p.add_argument("--json", default="pretrained.json", help="results, written row by row (resumed)")
    p.add_argument("--rows", nargs="*", default=None, help=f"row keys (default all): {[r[0] for r in ROWS]}")
    p.add_argument("--quick", action="store_true", help=f"rows {QUICK} on fewer tokens")
    p.add_argument("--long-len", type=int, default=512, help="tokens of the long evaluation pieces")
    args = p.parse_args(argv)
    from tucker_attention.hf.calibration import attention_statistics
    from tucker_attention.hf.source import attention_summary, fidelity, load_source, make_inputs

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = load_source(args.model)
    model, tokenizer = source["model"], source["tokenizer"]
    sizes = {"n_calibration": 16, "n_eval": 8} if args.quick else {}
    cal, ev, described = make_inputs(model, tokenizer, None, **sizes)
    _, long, long_described = make_inputs(model, tokenizer, None, n_calibration=1, n_eval=2 if args.quick else 4,
                                          seq_len=args.long_len)
    start = time.perf_counter()
    data = {"cal": cal, "eval": ev, "long": long, "stats": attention_statistics(model, cal)}
    print(f"{described}; long pieces: {long_described.split('evaluation: ')[1]}; statistics in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    path = Path(args.json)
    saved = json.loads(path.read_text()) if path.exists() else {}
    meta = {"name": args.model, "source": attention_summary(model, torch.float32), "data": described,
            "long": long_described, "long_len": args.long_len, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "quick": args.quick,
            "source_ppl": fidelity(model, model, ev, "decoder")["ppl"],
            "source_answer": greedy_answer(model, tokenizer)}
    if saved.get("meta", {}).get("quick") != args.quick or saved.get("meta", {}).get("name") != args.model:
        saved = {}                                         # another run's results: start over
    results = saved.get("results", {})
    wanted = QUICK if args.quick else (args.rows or [r[0] for r in ROWS])
    for key, label, method, options in ROWS:
        if key not in wanted:
            continue
        if key in results:
            print(f"{label}: done before (resumed)", flush=True)
            continue
        row = measure(key, label, method, options, source, data)
        results[key] = row
        write_json(path, {"meta": meta, "results": results})
        print(f"{label}: {row['setting']}, KL {row['kl']:.4g}, top-1 {row['top1']:.3f}, ppl {row['ppl']:.2f}, "
              f"KL long {row['kl_long']:.4g}, {row['answer']!r} ({row['seconds']:.0f} s)", flush=True)
    table = markdown({k: results[k] for k, *_ in ROWS if k in results}, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
