"""``tucker-attn compare``: train one model per attention method with a shared budget and
compare validation quality against attention parameters and KV cache (paper §7, in miniature).

Every model trains in ``OUT/runs/<label>`` with the shared trainer; a finished run (its
``summary.json`` written by the same config) is reused and an interrupted one resumes from
its checkpoint, so re-running the command continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .._table import text_table
from ..training import RunConfig, apply_overrides, make_task, train
from ..training.checkpoint import step_dirs

# lr 5e-3 was the best of {2, 3, 5, 8}e-3 for MHA under this budget (docs/lm-study.md)
_CPU_TRAIN = {"steps": 600, "batch_size": 32, "lr": 5e-3, "warmup_steps": 60, "eval_interval": 200,
              "eval_windows": 256, "checkpoint_interval": 200, "log_interval": 10}


@dataclass
class ComparePreset:
    """A shared model/training budget and the attention settings trained under it."""

    description: str
    model: dict
    train: dict
    attention: dict[str, dict] = field(default_factory=dict)  # label -> attention spec
    data: dict = field(default_factory=dict)


LM_PRESETS = {
    "default": ComparePreset(
        "char-level Shakespeare, d_model 128, 4 layers, 4 heads, 128-token context, 600 steps of 32 windows; "
        "~12 min on 2 CPU cores",
        model={"d_model": 128, "n_heads": 4, "n_layers": 4, "block_size": 128},
        train=_CPU_TRAIN,
        attention={"MHA": {"method": "mha"},
                   "GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
                   "MLA dc=32": {"method": "mla", "kv_rank": 32},
                   "Tucker [4,32,32]": {"method": "tucker", "ranks": [4, 32, 32]},
                   "Tucker [4,30,16]": {"method": "tucker", "ranks": [4, 30, 16]},
                   "Tucker [4,16,16]": {"method": "tucker", "ranks": [4, 16, 16]}}),
    "tiny": ComparePreset(
        "a smoke test: d_model 32, 1 layer, 20 steps",
        model={"d_model": 32, "n_heads": 4, "n_layers": 1, "block_size": 32},
        train={**_CPU_TRAIN, "steps": 20, "batch_size": 8, "warmup_steps": 2, "eval_interval": 20,
               "eval_windows": 16, "checkpoint_interval": 10},
        attention={"MHA": {"method": "mha"},
                   "GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
                   "MLA dc=8": {"method": "mla", "kv_rank": 8},
                   "Tucker [4,16,8]": {"method": "tucker", "ranks": [4, 16, 8]},
                   "Tucker [2,8,8]": {"method": "tucker", "ranks": [2, 8, 8]},
                   "Tucker [2,8,4]": {"method": "tucker", "ranks": [2, 8, 4]}}),
    "gpt2-small": ComparePreset(
        "GPT-2 small shapes (d_model 768, 12 layers, 12 heads, 1024 context) and Table 2's settings; for a GPU",
        model={"d_model": 768, "n_heads": 12, "n_layers": 12, "block_size": 1024},
        train={**_CPU_TRAIN, "steps": 5000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 500,
               "eval_interval": 500, "eval_windows": 512, "checkpoint_interval": 500},
        attention={"MHA": {"method": "mha"},
                   "GQA kv=4": {"method": "gqa", "n_kv_heads": 4},
                   "GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
                   "MLA dc=128": {"method": "mla", "kv_rank": 128, "q_rank": 128},
                   "Tucker [8,128,128]": {"method": "tucker", "ranks": [8, 128, 128]},
                   "Tucker [8,128,64]": {"method": "tucker", "ranks": [8, 128, 64]},
                   "Tucker [8,64,64]": {"method": "tucker", "ranks": [8, 64, 64]}}),
}


_VIT_TRAIN = {"steps": 800, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50, "eval_interval": 400,
              "checkpoint_interval": 400, "log_interval": 10, "weight_decay": 0.05}

VIT_PRESETS = {
    "default": ComparePreset(
        "Fashion-MNIST, ViT d_model 64, 4 layers, 4 heads, patch 4 (49 patches + class token), 800 steps of 128 "
        "images; ~10 min on 2 CPU cores",
        model={"d_model": 64, "n_heads": 4, "n_layers": 4, "patch_size": 4},
        train=_VIT_TRAIN,
        attention={"MHA": {"method": "mha"},
                   "GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
                   "MLA dc=16": {"method": "mla", "kv_rank": 16},
                   "Tucker [4,16,16]": {"method": "tucker", "ranks": [4, 16, 16]},
                   "Tucker [4,16,8]": {"method": "tucker", "ranks": [4, 16, 8]},
                   "Tucker [4,8,8]": {"method": "tucker", "ranks": [4, 8, 8]}},
        data={"source": "fashion-mnist"}),
    "tiny": ComparePreset(
        "a smoke test on scikit-learn's 8x8 digits: d_model 32, 1 layer, patch 2",
        model={"d_model": 32, "n_heads": 4, "n_layers": 1, "patch_size": 2},
        train={**_VIT_TRAIN, "steps": 20, "batch_size": 32, "warmup_steps": 2, "eval_interval": 20,
               "checkpoint_interval": 10},
        attention={"MHA": {"method": "mha"},
                   "GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
                   "MLA dc=8": {"method": "mla", "kv_rank": 8},
                   "Tucker [4,16,8]": {"method": "tucker", "ranks": [4, 16, 8]},
                   "Tucker [2,8,8]": {"method": "tucker", "ranks": [2, 8, 8]},
                   "Tucker [2,8,4]": {"method": "tucker", "ranks": [2, 8, 4]}},
        data={"source": "digits", "augment": False}),
}

PRESETS = {"lm": LM_PRESETS, "vit": VIT_PRESETS}


def compare_configs(preset: str = "default", *, steps: int | None = None, overrides: list[str] = (),
                    task: str = "lm") -> dict[str, RunConfig]:
    """{label: RunConfig} of every model of ``preset``, with ``--set`` overrides and ``steps`` applied."""
    task_type = make_task_type(task)
    presets = PRESETS[task]
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)} for task {task!r}, got {preset!r}")
    p = presets[preset]
    base = {"task": task, "model": copy.deepcopy(p.model), "train": dict(p.train), "data": dict(p.data)}
    if steps is not None:
        base["train"]["steps"] = steps
    if any(o.partition("=")[0].startswith("model.attention") for o in overrides):
        raise ValueError("compare sets the attention of every model itself; --set model.attention.* is not allowed")
    base = apply_overrides(base, list(overrides), task_type.config_cls)
    configs = {}
    for label, spec in p.attention.items():
        cfg = copy.deepcopy(base)
        cfg["model"]["attention"] = copy.deepcopy(spec)
        configs[label] = RunConfig.from_dict(cfg)
    return configs


def make_task_type(task: str):
    from ..training.tasks import TASK_TYPES

    if task not in TASK_TYPES:
        raise ValueError(f"task must be one of {sorted(TASK_TYPES)}, got {task!r}")
    return TASK_TYPES[task]


def _slug(label: str) -> str:
    """A folder name for a model label: "Tucker [4,16,8]" -> "tucker-4-16-8"."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def run_compare(preset: str = "default", out: str | Path = "compare-out", *, steps: int | None = None,
                overrides: list[str] = (), task: str = "lm", progress: bool = True) -> list[dict]:
    """Train every model of ``preset`` (reusing finished runs), write ``results.json`` and
    ``compare.png`` in ``out``, and return the records."""
    configs = compare_configs(preset, steps=steps, overrides=overrides, task=task)
    out = Path(out)
    shared = None
    records = []
    for i, (label, config) in enumerate(configs.items()):
        config.train.progress = progress
        run_dir = out / "runs" / _slug(label)
        summary = _finished(run_dir, config)
        if summary is None:
            shared = make_task(config, reuse=shared)
            resume = bool(step_dirs(run_dir)) and _same_config(run_dir, config)
            print(f"[{i + 1}/{len(configs)}] {label}" + (" (resuming)" if resume else ""), flush=True)
            summary = train(config, run_dir, resume=resume, overwrite=True, task=shared)
        else:
            print(f"[{i + 1}/{len(configs)}] {label}: finished earlier, reusing {run_dir / 'summary.json'}")
        records.append(_record(label, config, summary, make_task_type(task)))
    task_type = make_task_type(task)
    add_ratios(records, task_type.metric, task_type.higher_is_better)
    write_json_atomic(out / "results.json", records)
    plot_compare(records, out / "compare.png", metric=task_type.metric,
                 lower_is_better=not task_type.higher_is_better)
    return records


def add_ratios(records: list[dict], metric: str, higher_is_better: bool) -> None:
    """Add ``attention_param_ratio`` and ``<metric>_vs_mha`` (relative change of a loss; difference
    of an accuracy) to every record, against the MHA record."""
    mha = next((r for r in records if r["method"] == "mha"), None)
    for r in records:
        r["attention_param_ratio"] = r["attention_params"] / mha["attention_params"] if mha else None
        if mha is None:
            r[f"{metric}_vs_mha"] = None
        else:
            r[f"{metric}_vs_mha"] = r[metric] - mha[metric] if higher_is_better else r[metric] / mha[metric] - 1


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _same_config(run_dir: Path, config: RunConfig) -> bool:
    path = run_dir / "config.json"
    if not path.is_file():
        return False
    stored = json.loads(path.read_text())
    stored["train"]["progress"] = config.train.progress
    return stored == json.loads(json.dumps(config.to_dict()))


def _finished(run_dir: Path, config: RunConfig) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file() or not _same_config(run_dir, config):
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("steps") == config.train.steps else None


def spec_record(label: str, spec: dict) -> dict:
    """``label``, ``method`` and the method's own size arguments of an attention spec."""
    spec = dict(spec)
    method = spec.pop("method")
    return {"label": label, "method": method, **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}}


def _record(label: str, config: RunConfig, summary: dict, task_type) -> dict:
    metric, speed = task_type.metric, f"{task_type.unit}_per_s"
    baselines = {k: v for k, v in summary.items() if k.startswith(("unigram", "majority"))}
    return {**spec_record(label, config.model["attention"]), "attention_params": summary["attention_params"],
            "params": summary["params"], "kv_bytes_per_token": summary["kv_bytes_per_token"],
            metric: summary[metric], "val_loss": summary["val_loss"], f"best_{metric}": summary[f"best_{metric}"],
            speed: summary[speed], "steps": summary["steps"], **baselines}


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
    lines = [f"{best['label']} ({best['attention_params'] / mha['attention_params']:.0%} of MHA's attention "
             f"parameters): val loss {delta:+.1%} vs MHA -> within {tolerance:.0%}: {verdict}"]
    for r in records:
        if r["method"] in ("gqa", "mqa", "mla"):
            better = r["val_loss"] < best["val_loss"]
            lines.append(f"{r['label']} ({r['attention_params'] / best['attention_params']:.1f}x its size): val loss "
                         f"{r['val_loss'] / mha['val_loss'] - 1:+.1%} vs MHA -> no better than it: "
                         f"{'NO' if better else 'yes'}")
    return lines


def pareto_front(records: list[dict], metric: str = "val_loss", lower_is_better: bool = True) -> list[dict]:
    """Records no other record beats on both attention parameters and ``metric``, by parameters."""
    sign = 1 if lower_is_better else -1
    front, best = [], float("inf")
    for r in sorted(records, key=lambda r: (r["attention_params"], sign * r[metric])):
        if sign * r[metric] < best:
            front.append(r)
            best = sign * r[metric]
    return front


_METHOD_NAMES = {"mha": "MHA", "gqa": "GQA", "mqa": "MQA", "mla": "MLA", "tucker": "Tucker"}


def plot_compare(records: list[dict], path: str | Path, *, metric: str = "val_loss",
                 lower_is_better: bool = True) -> Path:
    """``metric`` against attention parameters (log x): one labelled point per model, the
    Pareto front as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mha": "black", "gqa": "tab:blue", "mqa": "tab:cyan", "mla": "tab:green", "tucker": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in records):
        pts = [r for r in records if r["method"] == method]
        ax.scatter([r["attention_params"] for r in pts], [r[metric] for r in pts], color=colors.get(method),
                   label=_METHOD_NAMES.get(method, method), zorder=3)
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
