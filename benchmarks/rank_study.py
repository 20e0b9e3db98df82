"""The rank study: a compare preset over several seeds, mean ± std per setting, and the ranks the
rank-adaptive runs found per layer (docs/rank-study.md is written from its output).

    python benchmarks/rank_study.py --task lm --preset default --seeds 0 1 2 --out study-lm
    python benchmarks/rank_study.py --task vit --preset default --seeds 0 1 2 --out study-vit

Each seed is one ``tucker-attn compare`` in ``OUT/seed-N`` (``--set train.seed=N``; finished runs
are reused and interrupted ones resume, so rerunning continues). Prints, and writes to
``OUT/study.md``, the table of every setting: attention parameters (and their share of MHA's),
KV floats per token, the metric's mean ± std over the seeds and its change against MHA's mean;
then the adaptive runs' final ranks per layer and seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tucker_attention._table import text_table
from tucker_attention.experiments.compare import run_compare


def summarize(per_seed: dict[int, list[dict]], metric: str, higher_is_better: bool) -> tuple[str, str]:
    """(the mean ± std table, the adaptive runs' ranks) of the records of every seed."""
    labels = list(dict.fromkeys(r["label"] for records in per_seed.values() for r in records))
    by_label = {label: [r for records in per_seed.values() for r in records if r["label"] == label]
                for label in labels}
    mha = statistics.mean(r[metric] for r in by_label.get("MHA", [])) if "MHA" in by_label else None
    rows = []
    for label, runs in sorted(by_label.items(), key=lambda item: -item[1][0]["attention_params"]):
        values = [r[metric] for r in runs]
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        params = statistics.mean(r["attention_params"] for r in runs)
        share = f"{params / by_label['MHA'][0]['attention_params']:.3f}" if "MHA" in by_label else "-"
        if mha is None:
            delta = "-"
        elif higher_is_better:
            delta = f"{100 * (mean - mha):+.1f} pts"
        else:
            delta = f"{100 * (mean / mha - 1):+.1f}%"
        rows.append([label, runs[0]["method"], f"{params:,.0f}", share, str(runs[0]["kv_bytes_per_token"]),
                     f"{mean:.4f} ± {std:.4f}", delta, str(len(runs))])
    table = text_table(["setting", "method", "attn params", "vs MHA", "KV B/token (bf16)", f"{metric} mean ± std",
                        "Δ vs MHA", "seeds"], rows)
    lines = []
    for label, runs in by_label.items():
        for seed, r in zip(per_seed, runs):
            if r.get("rank_budget"):  # a rank-adaptive run (fixed-rank records hold their one ranks triple)
                ranks = "; ".join(f"L{i}: {tuple(w)} / {tuple(v)}" for i, (w, v) in enumerate(r["ranks"]))
                lines.append(f"{label}, seed {seed}: {ranks}")
    return table, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="lm", choices=("lm", "vit"))
    p.add_argument("--preset", default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="override the preset's steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every model, as in `tucker-attn compare --set` (e.g. data.path=DIR)")
    p.add_argument("--out", default="rank-study")
    args = p.parse_args(argv)
    out = Path(args.out)
    per_seed = {}
    for seed in args.seeds:
        print(f"== seed {seed}", flush=True)
        per_seed[seed] = run_compare(args.preset, out / f"seed-{seed}", steps=args.steps, task=args.task,
                                     overrides=[*args.overrides, f"train.seed={seed}"], progress=False)
    metric, higher = ("val_loss", False) if args.task == "lm" else ("val_accuracy", True)
    table, ranks = summarize(per_seed, metric, higher)
    text = (f"{args.task} --preset {args.preset}, seeds {args.seeds}\n\n{table}\n\nranks found (W / W~ per layer):\n"
            f"{ranks or '(no rank-adaptive runs)'}\n")
    print(text)
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps(per_seed, indent=1))


if __name__ == "__main__":
    main()
