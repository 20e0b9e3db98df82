"""The report of ``tucker-attn compare`` from its records: the table, the rank-adaptive runs' final
ranks, the paper's claim checks and parameter ratio at matched quality (``claim.json``), the Pareto
front and ``compare.png``."""

from __future__ import annotations

from pathlib import Path

from .._table import text_table
from .compare_runs import make_task_type


def format_compare_table(records: list[dict], metric: str = "val_loss", unit: str = "tokens") -> str:
    """A plain-text table of the records (sorted by attention parameters, largest first)."""
    head = ["model", "method", "attn params", "vs MHA", "KV B/token (bf16)", metric, "Δ vs MHA", f"{unit}/s"]
    rows = []
    for r in sorted(records, key=lambda r: -r["attention_params"]):
        ratio = f"{r['attention_param_ratio']:.3f}" if r.get("attention_param_ratio") is not None else "-"
        delta = r.get(f"{metric}_vs_mha")
        delta = "-" if delta is None else f"{100 * delta:+.1f}" + ("%" if metric == "val_loss" else " pts")
        rows.append([r["label"], r["method"], f"{r['attention_params']:,}", ratio, str(r["kv_bytes_per_token"]),
                     f"{r[metric]:.4f}", delta, f"{r[f'{unit}_per_s']:,.0f}"])
    return text_table(head, rows)


def format_adaptive_ranks(records: list[dict]) -> list[str]:
    """One line per rank-adaptive record: its budget and the final ranks of each layer."""
    lines = []
    for r in records:
        if "rank_budget" not in r:
            continue
        b = r["rank_budget"]
        unit = "attention params" if b["kind"] == "params" else "KV floats/token"
        layers = "; ".join(f"[{','.join(map(str, w))}]/[{','.join(map(str, v))}]" for w, v in r["ranks"])
        lines.append(f"{r['label']}: budget {b['budget']:,} {unit} ({b['budget'] / b['mha']:.1%} of MHA's), "
                     f"ends at {r['attention_params']:,} params; ranks per layer [r1,r2,r3]/[r1~,r2~,r3~]: {layers}")
    return lines


# (max share of MHA's attention parameters, val-loss tolerance vs MHA) of the claim checks
CLAIM_CHECKS = ((0.25, 0.03), (0.10, 0.05))
BASELINE_METHODS = ("gqa", "mqa", "mla")
MATCH_TOLERANCE = 0.01  # LM: 1 % of the val loss; ViT: 1 point of accuracy


def claim_check(records: list[dict], *, max_ratio: float = 0.25, tolerance: float = 0.03) -> list[str]:
    """The paper's claim in miniature, stated per model from the measured records: the best Tucker
    setting with at most ``max_ratio`` of MHA's attention parameters is within ``tolerance`` of
    MHA's val loss, and the GQA/MLA models (larger than it) do no better."""
    mha = next((r for r in records if r["method"] == "mha"), None)
    small = [r for r in records if r["method"] == "tucker" and mha and r["attention_params"] <= max_ratio *
             mha["attention_params"]]
    if not small:
        return [f"no Tucker setting with at most {max_ratio:.0%} of MHA's attention parameters to check"]
    best = min(small, key=lambda r: r["val_loss"])
    delta = best["val_loss"] / mha["val_loss"] - 1
    verdict = "yes" if delta <= tolerance else "NO"
    lines = [f"{best['label']} ({best['attention_params'] / mha['attention_params']:.1%} of MHA's attention "
             f"parameters): val loss {delta:+.1%} vs MHA -> within {tolerance:.0%}: {verdict}"]
    for r in records:
        if r["method"] in BASELINE_METHODS:
            better = r["val_loss"] < best["val_loss"]
            lines.append(f"{r['label']} ({r['attention_params'] / best['attention_params']:.1f}x its size): val loss "
                         f"{r['val_loss'] / mha['val_loss'] - 1:+.1%} vs MHA -> no better than it: "
                         f"{'NO' if better else 'yes'}")
    return lines


def claim_check_title(max_ratio: float, tolerance: float) -> str:
    return (f"claim (a Tucker setting <= {max_ratio:.0%} of MHA's attention parameters within {tolerance:.0%} of "
            f"MHA's val loss; GQA/MLA no better):")


def _within(value: float, best: float, higher_is_better: bool, tolerance: float) -> bool:
    slack = 1e-12  # a value exactly at the bound counts, whatever the binary rounding of the bound
    return value >= best - tolerance - slack if higher_is_better else value <= best * (1 + tolerance) + slack


def matched_quality_ratio(records: list[dict], metric: str = "val_loss", higher_is_better: bool = False,
                          tolerance: float = MATCH_TOLERANCE) -> tuple[float, dict, dict] | None:
    """The paper's "order of magnitude fewer attention parameters at comparable quality", measured:
    the best GQA/MQA/MLA record by ``metric``; the Tucker records (fixed or rank-adaptive) within
    ``tolerance`` of it (a loss: at most best x (1 + tolerance); an accuracy: at least best -
    tolerance); the smallest of those by attention parameters. Returns (its attention parameters
    / the baseline's, the Tucker record, the baseline record), or None when no baseline or no
    Tucker record qualifies."""
    baselines = [r for r in records if r["method"] in BASELINE_METHODS]
    if not baselines:
        return None
    sign = -1 if higher_is_better else 1
    base = min(baselines, key=lambda r: sign * r[metric])
    close = [r for r in records if r["method"] == "tucker"
             and _within(r[metric], base[metric], higher_is_better, tolerance)]
    if not close:
        return None
    tucker = min(close, key=lambda r: (r["attention_params"], sign * r[metric]))
    return tucker["attention_params"] / base["attention_params"], tucker, base


PAPER_RATIO = 0.1  # "an order of magnitude fewer attention parameters"


def matched_quality(records: list[dict], metric: str = "val_loss", higher_is_better: bool = False,
                    tolerance: float = MATCH_TOLERANCE) -> dict:
    """:func:`matched_quality_ratio` as JSON data with a one-line ``text``; with no Tucker record
    within tolerance, the closest one (best ``metric``) and its ``gap`` instead of a ratio."""
    points = 100 * tolerance
    tol_text = (f"{points:g} point{'' if points == 1 else 's'} of accuracy" if higher_is_better
                else f"{tolerance:.0%} val loss")
    found = matched_quality_ratio(records, metric, higher_is_better, tolerance)
    out = {"metric": metric, "tolerance": tolerance, "tolerance_kind": "absolute" if higher_is_better else "relative",
           "paper_ratio": PAPER_RATIO}
    baselines = [r for r in records if r["method"] in BASELINE_METHODS]
    tuckers = [r for r in records if r["method"] == "tucker"]
    if found is not None:
        ratio, tucker, base = found
        verdict = "yes" if ratio <= PAPER_RATIO else "NO"
        out.update(ratio=ratio, tucker=_brief(tucker, metric), baseline=_brief(base, metric),
                   within_paper_ratio=ratio <= PAPER_RATIO,
                   text=f"parameter ratio at matched quality: {tucker['label']} ({tucker['attention_params']:,}) / "
                        f"{base['label']} ({base['attention_params']:,}) = {ratio:.3f} (the smallest Tucker within "
                        f"{tol_text} of the best GQA/MLA; the paper's order of magnitude: <= {PAPER_RATIO}: "
                        f"{verdict})")
        return out
    out["ratio"] = None
    if not baselines or not tuckers:
        out["text"] = "parameter ratio at matched quality: - (needs a GQA/MLA and a Tucker record)"
        return out
    sign = -1 if higher_is_better else 1
    base = min(baselines, key=lambda r: sign * r[metric])
    closest = min(tuckers, key=lambda r: sign * r[metric])
    gap = base[metric] - closest[metric] if higher_is_better else closest[metric] / base[metric] - 1
    gap_text = f"{100 * gap:.1f} points lower" if higher_is_better else f"{gap:+.1%}"
    out.update(baseline=_brief(base, metric), closest=_brief(closest, metric), gap=gap,
               text=f"parameter ratio at matched quality: none - no Tucker setting is within {tol_text} of "
                    f"{base['label']} ({metric} {base[metric]:.4f}); the closest, {closest['label']} "
                    f"({closest['attention_params']:,} attention params, "
                    f"{closest['attention_params'] / base['attention_params']:.3f}x), is {gap_text}")
    return out


def _brief(r: dict, metric: str) -> dict:
    return {"label": r["label"], "method": r["method"], "attention_params": r["attention_params"],
            metric: r[metric]}


def compare_claim(records: list[dict], task: str = "lm") -> dict:
    """What ``claim.json`` holds: the matched-quality ratio and, for the LM, the claim checks."""
    task_type = make_task_type(task)
    claim = {"matched_quality": matched_quality(records, task_type.metric, task_type.higher_is_better)}
    if task_type.metric == "val_loss":
        claim["claim_checks"] = [{"max_ratio": m, "tolerance": t, "title": claim_check_title(m, t),
                                  "lines": claim_check(records, max_ratio=m, tolerance=t)} for m, t in CLAIM_CHECKS]
    return claim


def pareto_front(records: list[dict], metric: str = "val_loss", lower_is_better: bool = True) -> list[dict]:
    """Records no other record beats on both attention parameters and ``metric``, by parameters."""
    sign = 1 if lower_is_better else -1
    front, best = [], float("inf")
    for r in sorted(records, key=lambda r: (r["attention_params"], sign * r[metric])):
        if sign * r[metric] < best:
            front.append(r)
            best = sign * r[metric]
    return front


#: The attention methods' names in tables and plots.
METHOD_NAMES = {"mha": "MHA", "gqa": "GQA", "mqa": "MQA", "mla": "MLA", "tucker": "Tucker"}


def plot_compare(records: list[dict], path: str | Path, *, metric: str = "val_loss",
                 lower_is_better: bool = True) -> Path:
    """``metric`` against attention parameters (log x): one labelled point per model, the
    Pareto front as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mha": "black", "gqa": "tab:blue", "mqa": "tab:cyan", "mla": "tab:green", "tucker": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, adaptive in dict.fromkeys((r["method"], "rank_budget" in r) for r in records):
        pts = [r for r in records if r["method"] == method and ("rank_budget" in r) == adaptive]
        name = METHOD_NAMES.get(method, method) + (" (rank-adaptive)" if adaptive else "")
        ax.scatter([r["attention_params"] for r in pts], [r[metric] for r in pts], color=colors.get(method),
                   marker="D" if adaptive else "o", label=name, zorder=3)
        for r in pts:
            ax.annotate(r["label"], (r["attention_params"], r[metric]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    front = pareto_front(records, metric, lower_is_better)
    ax.plot([r["attention_params"] for r in front], [r[metric] for r in front], "--", color="gray",
            label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("attention parameters (whole model)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
