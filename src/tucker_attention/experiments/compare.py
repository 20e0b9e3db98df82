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
# the default's 7 models in ~15 min on 2 CPU cores: 500 of those steps (600 take ~2.4 min a model)
_CPU_TRAIN_DEFAULT = {**_CPU_TRAIN, "steps": 500, "eval_interval": 250, "checkpoint_interval": 250}


@dataclass
class ComparePreset:
    """A shared model/training budget and the attention settings trained under it.

    ``attention`` maps a label to an attention spec; an entry may carry a ``"train"`` dict of
    per-model train settings (e.g. ``{"method": "tucker", "train": {"rank_budget_params": 0.1}}``,
    a rank-adaptive run), which goes into that model's run config, not into its spec.
    """

    description: str
    model: dict
    train: dict
    attention: dict[str, dict] = field(default_factory=dict)  # label -> attention spec [+ "train"]
    data: dict = field(default_factory=dict)


# The default presets test the paper's claim where it makes it (PAPER.md §6-§7), with every
# percentage computed from the layers (tests/test_compare_claim.py checks them):
# LM (d_model 128, 4 layers): MHA 262,144 attention parameters, GQA kv=2 196,608, MLA dc=32
# 180,224 (the smallest baseline; a fifth of it is 36,044), KV floats per token MLA 128 (32 a layer).
_LM_DEFAULT = {
    "MHA": {"method": "mha"},
    "GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
    "MLA dc=32": {"method": "mla", "kv_rank": 32},
    # one shared latent of width 32 = MLA's d_c (the same KV cache); 32,896: 18.3% of MLA, 12.5% of MHA
    "Tucker shared [4,8,32]": {"method": "tucker", "ranks": [4, 8, 32], "shared_kv": True},
    "Tucker [4,12,8]": {"method": "tucker", "ranks": [4, 12, 8]},      # 23,680: 9.0% of MHA
    "Tucker auto 1/5 MLA": {"method": "tucker", "train": {"rank_budget_params": 36044}},
    "Tucker auto 10%": {"method": "tucker", "train": {"rank_budget_params": 0.1}},
}
_LM_STUDY = {
    **_LM_DEFAULT,
    "Tucker shared [4,16,32]": {"method": "tucker", "ranks": [4, 16, 32], "shared_kv": True},  # 49,280: 27% of MLA
    "Tucker [4,16,12]": {"method": "tucker", "ranks": [4, 16, 12]},    # 34,944: 19.4% of MLA
    "Tucker [4,32,32]": {"method": "tucker", "ranks": [4, 32, 32]},
    "Tucker [4,30,16]": {"method": "tucker", "ranks": [4, 30, 16]},
    "Tucker [4,16,16]": {"method": "tucker", "ranks": [4, 16, 16]},
    "Tucker auto 25%": {"method": "tucker", "train": {"rank_budget_params": 0.25}},
}
# the study's budgets (docs/rank-study.md): 25 % of MHA's attention parameters, and 1/4 and 1/10 of
# MLA's KV floats per token (128: 32 and 12), each as fixed-rank Tucker (separate and shared latents), rank-adaptive
# Tucker and the nearest MLA. MLA cannot go near 25 % of MHA's parameters: its d x d output projection alone is 25 %.
_LM_BUDGETS = {
    **_LM_DEFAULT,
    "Tucker [4,30,16]": {"method": "tucker", "ranks": [4, 30, 16]},    # 62,592: 23.9% of MHA
    "Tucker auto 25%": {"method": "tucker", "train": {"rank_budget_params": 0.25}},
    "MLA dc=8": {"method": "mla", "kv_rank": 8},                       # KV 32 floats: 1/4 of MLA dc=32
    "Tucker [4,16,4]": {"method": "tucker", "ranks": [4, 16, 4]},      # KV 32 floats
    "Tucker shared [4,16,8]": {"method": "tucker", "ranks": [4, 16, 8], "shared_kv": True},  # KV 32: MLA dc=8's
    "Tucker auto KV 1/4 MLA": {"method": "tucker", "train": {"rank_budget_kv": 32}},
    "MLA dc=4": {"method": "mla", "kv_rank": 4},   # KV 16 floats: the nearest above 1/10 (RoPE needs an even d_c)
    "Tucker shared [4,16,4]": {"method": "tucker", "ranks": [4, 16, 4], "shared_kv": True},  # KV 16: MLA dc=4's
    "Tucker [4,16,2]+[4,16,1]": {"method": "tucker", "ranks": [4, 16, 2], "value_ranks": [4, 16, 1]},  # KV 12
    "Tucker auto KV 1/10 MLA": {"method": "tucker", "train": {"rank_budget_kv": 12}},
}
# ViT (d_model 64, 4 layers): MHA 65,536, GQA kv=2 49,152, MLA dc=16 45,056 (a fifth: 9,011),
# MLA's KV floats per token 64 (16 a layer).
_VIT_DEFAULT = {
    "MHA": {"method": "mha"},
    "GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
    "MLA dc=16": {"method": "mla", "kv_rank": 16},
    "Tucker shared [4,8,16]": {"method": "tucker", "ranks": [4, 8, 16], "shared_kv": True},  # 12,416: 28% of MLA
    "Tucker [4,8,6]": {"method": "tucker", "ranks": [4, 8, 6]},        # 8,832: 19.6% of MLA, 13.5% of MHA
    "Tucker [4,6,4]": {"method": "tucker", "ranks": [4, 6, 4]},        # 6,016: 9.2% of MHA
    "Tucker auto 1/5 MLA": {"method": "tucker", "train": {"rank_budget_params": 9011}},
    "Tucker auto 10%": {"method": "tucker", "train": {"rank_budget_params": 0.1}},
}
# as _LM_BUDGETS, for MLA dc=16's 64 KV floats (1/4: 16; 1/8: 8, the smallest Tucker's)
_VIT_BUDGETS = {
    **_VIT_DEFAULT,
    "Tucker [4,16,7]": {"method": "tucker", "ranks": [4, 16, 7]},      # <= 25% of MHA
    "Tucker auto 25%": {"method": "tucker", "train": {"rank_budget_params": 0.25}},
    "MLA dc=4": {"method": "mla", "kv_rank": 4},                       # KV 16 floats: 1/4 of MLA dc=16
    "Tucker [4,8,2]": {"method": "tucker", "ranks": [4, 8, 2]},        # KV 16 floats
    "Tucker shared [4,8,4]": {"method": "tucker", "ranks": [4, 8, 4], "shared_kv": True},  # KV 16: MLA dc=4's
    "Tucker auto KV 1/4 MLA": {"method": "tucker", "train": {"rank_budget_kv": 16}},
    "MLA dc=2": {"method": "mla", "kv_rank": 2},                       # KV 8 floats: the nearest above 1/10
    "Tucker [4,8,1]": {"method": "tucker", "ranks": [4, 8, 1]},        # KV 8 floats
    "Tucker shared [4,8,2]": {"method": "tucker", "ranks": [4, 8, 2], "shared_kv": True},  # KV 8: MLA dc=2's
}  # 1/10 of MLA's KV (6 floats) is below the smallest Tucker (8: r3 = r3~ = 1 in 4 layers): no adaptive run
# tiny (d_model 32, 1 layer): MHA 4,096, GQA kv=2 3,072, MLA dc=8 2,816 (a fifth: 563), MLA's KV 8 floats
_TINY = {
    "MHA": {"method": "mha"},
    "GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
    "MLA dc=8": {"method": "mla", "kv_rank": 8},
    "Tucker shared [4,8,8]": {"method": "tucker", "ranks": [4, 8, 8], "shared_kv": True},  # 1,312, KV 8
    "Tucker [2,4,2]": {"method": "tucker", "ranks": [2, 4, 2]},        # 432: 15.3% of MLA
    "Tucker [2,3,2]": {"method": "tucker", "ranks": [2, 3, 2]},        # 360: 8.8% of MHA
    "Tucker auto 10%": {"method": "tucker", "train": {"rank_budget_params": 0.1}},
}

LM_PRESETS = {
    "default": ComparePreset(
        "char-level Shakespeare, d_model 128, 4 layers, 4 heads, 128-token context, 500 steps of 32 windows; "
        "MHA, GQA kv=2, MLA dc=32, a shared-latent Tucker with MLA's KV cache at <= 1/5 of MLA (18%), a fixed "
        "Tucker at <= 1/10 of MHA (9%), rank-adaptive Tucker at the same two budgets; ~15 min on 2 CPU cores",
        model={"d_model": 128, "n_heads": 4, "n_layers": 4, "block_size": 128},
        train=_CPU_TRAIN_DEFAULT,
        attention=_LM_DEFAULT),
    "study": ComparePreset(
        "the default's shapes and settings at the 600-step budget of docs/lm-study.md, with more Tucker settings "
        "(a wider shared latent, [4,16,12] at 1/5 of MLA, the earlier [4,32,32], [4,30,16], [4,16,16], a 25% "
        "rank-adaptive run); ~32 min on 2 CPU cores",
        model={"d_model": 128, "n_heads": 4, "n_layers": 4, "block_size": 128},
        train=_CPU_TRAIN,
        attention=_LM_STUDY),
    "budgets": ComparePreset(
        "the default and the rank study's budgets (docs/rank-study.md): 25% of MHA's attention parameters, 1/4 "
        "and 1/10 of MLA's KV floats, each as fixed Tucker (separate and shared latents), rank-adaptive Tucker and "
        "the nearest MLA; ~40 min on 2 CPU cores",
        model={"d_model": 128, "n_heads": 4, "n_layers": 4, "block_size": 128},
        train=_CPU_TRAIN_DEFAULT,
        attention=_LM_BUDGETS),
    "tiny": ComparePreset(
        "a smoke test: d_model 32, 1 layer, 20 steps",
        model={"d_model": 32, "n_heads": 4, "n_layers": 1, "block_size": 32},
        train={**_CPU_TRAIN, "steps": 20, "batch_size": 8, "warmup_steps": 2, "eval_interval": 20,
               "eval_windows": 16, "checkpoint_interval": 10},
        attention=_TINY),
    "gpt2-small": ComparePreset(
        "the paper's GPT-2 recipe (nanoGPT's) for a GPU: GPT-2 small shapes (d_model 768, 12 layers, 12 heads, "
        "1024 context), 16 windows x 32 accumulated micro-batches x 1024 = 524,288 tokens a step (train.batch_size "
        "is global: the same for any number of DDP processes; with N GPUs trade --set train.batch_size=16N "
        "train.grad_accum_steps=32/N), AdamW betas (0.9, 0.95), lr 6e-4, 2000 warmup steps, cosine to 6e-5, weight "
        "decay 0.1, bf16 autocast, torch.compile; 5000 steps = 2.6B tokens (~20 per parameter, not the paper's 600k "
        "iterations); Table 2's MHA, GQA kv=4 and 2, MLA dc=128, Tucker [8,128,128], [8,128,64], [8,64,64]. "
        "--data must be a folder prepared with GPT-2 BPE by tucker-attn prepare-data",
        model={"d_model": 768, "n_heads": 12, "n_layers": 12, "block_size": 1024},
        # the number of steps is this preset's choice (2.6B tokens, near Chinchilla's 20 tokens per parameter for
        # a 124M model); the rest is nanoGPT's GPT-2 config (train_gpt2.py), which the paper trained with
        train={"steps": 5000, "batch_size": 16, "grad_accum_steps": 32, "lr": 6e-4, "min_lr_ratio": 0.1,
               "warmup_steps": 2000, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0,
               "precision": "bf16", "compile": True, "eval_interval": 250, "eval_windows": 512,
               "checkpoint_interval": 250, "log_interval": 10},
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
        "images; MHA, GQA kv=2, MLA dc=16, a shared-latent Tucker with MLA's KV cache, fixed Tucker at <= 1/5 of "
        "MLA (20%) and <= 1/10 of MHA (9%), rank-adaptive Tucker at the same two budgets; ~13 min on 2 CPU cores",
        model={"d_model": 64, "n_heads": 4, "n_layers": 4, "patch_size": 4},
        train=_VIT_TRAIN,
        attention=_VIT_DEFAULT,
        data={"source": "fashion-mnist"}),
    "study": ComparePreset(
        "the default's shapes and budget with more settings (the default's and the earlier Tucker [4,16,16], "
        "[4,16,8], [4,8,8], a wider shared latent, a 25% rank-adaptive run); ~21 min on 2 CPU cores",
        model={"d_model": 64, "n_heads": 4, "n_layers": 4, "patch_size": 4},
        train=_VIT_TRAIN,
        attention={**_VIT_DEFAULT,
                   "Tucker [4,16,16]": {"method": "tucker", "ranks": [4, 16, 16]},
                   "Tucker [4,16,8]": {"method": "tucker", "ranks": [4, 16, 8]},
                   "Tucker [4,8,8]": {"method": "tucker", "ranks": [4, 8, 8]},
                   "Tucker shared [4,16,16]": {"method": "tucker", "ranks": [4, 16, 16], "shared_kv": True},
                   "Tucker auto 25%": {"method": "tucker", "train": {"rank_budget_params": 0.25}}},
        data={"source": "fashion-mnist"}),
    "budgets": ComparePreset(
        "the default and the rank study's budgets (docs/rank-study.md): 25% of MHA's attention parameters, 1/4 "
        "and 1/10 of MLA's KV floats, each as fixed Tucker (separate and shared latents), rank-adaptive Tucker and "
        "the nearest MLA; ~30 min on 2 CPU cores",
        model={"d_model": 64, "n_heads": 4, "n_layers": 4, "patch_size": 4},
        train=_VIT_TRAIN,
        attention=_VIT_BUDGETS,
        data={"source": "fashion-mnist"}),
    "tiny": ComparePreset(
        "a smoke test on scikit-learn's 8x8 digits: d_model 32, 1 layer, patch 2",
        model={"d_model": 32, "n_heads": 4, "n_layers": 1, "patch_size": 2},
        train={**_VIT_TRAIN, "steps": 20, "batch_size": 32, "warmup_steps": 2, "eval_interval": 20,
               "checkpoint_interval": 10},
        attention=_TINY,
        data={"source": "digits", "augment": False}),
}

PRESETS = {"lm": LM_PRESETS, "vit": VIT_PRESETS}


# per-model settings: a --set of these for every model would give MHA a rank budget
_PER_MODEL_TRAIN = ("rank_budget_params", "rank_budget_kv")


def split_entry(entry: dict) -> tuple[dict, dict]:
    """(attention spec, per-model train settings) of a preset entry."""
    entry = copy.deepcopy(entry)
    return entry, entry.pop("train", {})


def compare_configs(preset: str = "default", *, steps: int | None = None, overrides: list[str] = (),
                    task: str = "lm") -> dict[str, RunConfig]:
    """{label: RunConfig} of every model of ``preset``, with ``--set`` overrides and ``steps`` applied.

    ``overrides`` and ``steps`` apply to every model; an entry's own ``"train"`` settings then go
    into its run config. A ``--set`` of ``model.attention.*``, of a train key that an entry sets
    itself, or of a rank budget (``train.rank_budget_params`` / ``train.rank_budget_kv``: a
    per-model setting) is refused rather than silently overridden.
    """
    task_type = make_task_type(task)
    presets = PRESETS[task]
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)} for task {task!r}, got {preset!r}")
    p = presets[preset]
    base = {"task": task, "model": copy.deepcopy(p.model), "train": dict(p.train), "data": dict(p.data)}
    if steps is not None:
        base["train"]["steps"] = steps
    keys = [o.partition("=")[0] for o in overrides]
    if any(k.startswith("model.attention") for k in keys):
        raise ValueError("compare sets the attention of every model itself; --set model.attention.* is not allowed")
    per_model = {}  # train key -> labels of the entries that set it
    for label, entry in p.attention.items():
        for k in split_entry(entry)[1]:
            per_model.setdefault(k, []).append(label)
    for k in keys:
        name = k.removeprefix("train.")
        if k.startswith("train.") and (name in per_model or name in _PER_MODEL_TRAIN):
            who = f"; the preset sets it for {', '.join(per_model[name])}" if name in per_model else ""
            raise ValueError(f"--set {k} is a per-model setting of compare's entries{who}; it is not allowed")
    base = apply_overrides(base, list(overrides), task_type.config_cls)
    configs = {}
    for label, entry in p.attention.items():
        spec, train_settings = split_entry(entry)
        cfg = copy.deepcopy(base)
        cfg["model"]["attention"] = spec
        cfg["train"].update(train_settings)
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
    """Train every model of ``preset`` (reusing finished runs), write ``results.json`` (the
    records), ``claim.json`` (:func:`compare_claim`) and ``compare.png`` in ``out``, and return
    the records."""
    configs = compare_configs(preset, steps=steps, overrides=overrides, task=task)
    entries = PRESETS[task][preset].attention
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
        records.append(_record(label, config, summary, make_task_type(task), split_entry(entries[label])[1]))
    task_type = make_task_type(task)
    add_ratios(records, task_type.metric, task_type.higher_is_better)
    write_json_atomic(out / "results.json", records)
    write_json_atomic(out / "claim.json", {"task": task, "preset": preset, **compare_claim(records, task)})
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
    try:  # through RunConfig, so a run written before a train option existed gets its default
        stored = RunConfig.from_dict(json.loads(path.read_text())).to_dict()
    except (ValueError, TypeError, KeyError):
        return False
    stored["train"]["progress"] = config.train.progress
    return json.loads(json.dumps(stored)) == json.loads(json.dumps(config.to_dict()))


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


def _record(label: str, config: RunConfig, summary: dict, task_type, train_settings: dict | None = None) -> dict:
    """One model's results. A rank-adaptive run's record adds its final per-layer ``ranks``
    ([[r1, r2, r3], [r1~, r2~, r3~]] per layer, as in its summary.json) and ``rank_budget``."""
    metric, speed = task_type.metric, f"{task_type.unit}_per_s"
    baselines = {k: v for k, v in summary.items() if k.startswith(("unigram", "majority"))}
    adaptive = {k: summary[k] for k in ("ranks", "rank_budget") if "rank_budget" in summary and k in summary}
    extra = {"train_settings": dict(train_settings)} if train_settings else {}
    return {**spec_record(label, config.model["attention"]), **adaptive, **extra,
            "attention_params": summary["attention_params"],
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
    for method, adaptive in dict.fromkeys((r["method"], "rank_budget" in r) for r in records):
        pts = [r for r in records if r["method"] == method and ("rank_budget" in r) == adaptive]
        name = _METHOD_NAMES.get(method, method) + (" (rank-adaptive)" if adaptive else "")
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
