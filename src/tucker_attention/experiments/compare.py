"""``tucker-attn compare``: train one model per attention method with a shared budget and
compare validation quality against attention parameters and KV cache (paper §7, in miniature).

Every model trains in ``OUT/runs/<label>`` with the shared trainer; a finished run (its
``summary.json`` written by the same config) is reused and an interrupted one resumes from
its checkpoint, so re-running the command continues where it stopped.

This module holds the presets (the models and budgets compared), their run configs and
:func:`run_compare`; the run folders and records are in :mod:`.compare_runs`, the tables, claim
checks and plot in :mod:`.compare_report` (both re-exported here).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from ..training import RunConfig, apply_overrides, make_task, train
from ..training.checkpoint import step_dirs
from .compare_report import (
    BASELINE_METHODS,
    CLAIM_CHECKS,
    MATCH_TOLERANCE,
    METHOD_NAMES,
    PAPER_RATIO,
    claim_check,
    claim_check_title,
    compare_claim,
    format_adaptive_ranks,
    format_compare_table,
    matched_quality,
    matched_quality_ratio,
    pareto_front,
    plot_compare,
)
from .compare_runs import (
    add_ratios,
    finished,
    make_task_type,
    run_record,
    same_config,
    slug,
    spec_record,
    write_json_atomic,
)

__all__ = [
    "BASELINE_METHODS", "CLAIM_CHECKS", "LM_PRESETS", "MATCH_TOLERANCE", "PAPER_RATIO", "PRESETS", "VIT_PRESETS",
    "ComparePreset", "add_ratios", "claim_check", "claim_check_title", "compare_claim", "compare_configs",
    "format_adaptive_ranks", "format_compare_table", "make_task_type", "matched_quality", "matched_quality_ratio",
    "pareto_front", "plot_compare", "run_compare", "spec_record", "split_entry", "write_json_atomic",
    # helpers other experiments import from here
    "METHOD_NAMES", "finished", "run_record", "same_config", "slug",
]

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
        run_dir = out / "runs" / slug(label)
        summary = finished(run_dir, config)
        if summary is None:
            shared = make_task(config, reuse=shared)
            resume = bool(step_dirs(run_dir)) and same_config(run_dir, config)
            print(f"[{i + 1}/{len(configs)}] {label}" + (" (resuming)" if resume else ""), flush=True)
            summary = train(config, run_dir, resume=resume, overwrite=True, task=shared)
        else:
            print(f"[{i + 1}/{len(configs)}] {label}: finished earlier, reusing {run_dir / 'summary.json'}")
        records.append(run_record(label, config, summary, make_task_type(task), split_entry(entries[label])[1]))
    task_type = make_task_type(task)
    add_ratios(records, task_type.metric, task_type.higher_is_better)
    write_json_atomic(out / "results.json", records)
    write_json_atomic(out / "claim.json", {"task": task, "preset": preset, **compare_claim(records, task)})
    plot_compare(records, out / "compare.png", metric=task_type.metric,
                 lower_is_better=not task_type.higher_is_better)
    return records
