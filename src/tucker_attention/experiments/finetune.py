"""``tucker-attn finetune-compare``: the paper's ViT protocol (§7, Figure 3).

Take a trained MHA model, convert its attention layers for every setting (GQA/MLA by
truncated SVD, ``mha_to_gqa`` / ``mha_to_mla``; Tucker by truncated HOSVD, ``compress``),
measure the converted model as it is, fine-tune it briefly over several seeds, and compare
accuracy against attention parameters. Without ``--from`` the MHA baseline is trained first.
Every conversion is built (and its ranks checked) before any training starts.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._table import text_table
from ..layers import Attention
from ..models.blocks import layer_spec
from ..tensors.methods import METHODS, conversion_method, convert_layer
from ..training import RunConfig, make_task, train
from ..training.checkpoint import load_trained_model
from .compare import VIT_PRESETS, add_ratios, finished, slug, spec_record, write_json_atomic


@dataclass
class FinetunePreset:
    description: str
    baseline: str  # the VIT_PRESETS entry whose MHA model is the baseline
    finetune: dict  # train config of each fine-tune
    settings: dict[str, dict] = field(default_factory=dict)  # label -> target attention spec
    seeds: int = 3


FINETUNE_PRESETS = {
    "default": FinetunePreset(
        "Fashion-MNIST ViT (the compare default's MHA model), 9 conversions x 3 seeds of 150 fine-tune steps",
        baseline="default",
        finetune={"steps": 150, "batch_size": 128, "lr": 5e-4, "warmup_steps": 15, "eval_interval": 150,
                  "checkpoint_interval": 150, "log_interval": 10, "weight_decay": 0.05},
        settings={"GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
                  "GQA kv=1": {"method": "gqa", "n_kv_heads": 1},
                  "MLA dc=32": {"method": "mla", "kv_rank": 32},
                  "MLA dc=16": {"method": "mla", "kv_rank": 16},
                  "MLA dc=8": {"method": "mla", "kv_rank": 8},
                  "Tucker [4,32,16]": {"method": "tucker", "ranks": [4, 32, 16]},
                  "Tucker [4,16,16]": {"method": "tucker", "ranks": [4, 16, 16]},
                  "Tucker [4,16,8]": {"method": "tucker", "ranks": [4, 16, 8]},
                  "Tucker [4,8,8]": {"method": "tucker", "ranks": [4, 8, 8]}}),
    "tiny": FinetunePreset(
        "a smoke test on 8x8 digits", baseline="tiny",
        finetune={"steps": 4, "batch_size": 32, "lr": 5e-4, "warmup_steps": 1, "eval_interval": 4,
                  "checkpoint_interval": 4, "log_interval": 2},
        settings={"GQA kv=2": {"method": "gqa", "n_kv_heads": 2},
                  "MLA dc=8": {"method": "mla", "kv_rank": 8},
                  "Tucker [4,16,8]": {"method": "tucker", "ranks": [4, 16, 8]},
                  "Tucker [2,8,8]": {"method": "tucker", "ranks": [2, 8, 8]}},
        seeds=2),
}


def _convert(layer: Attention, spec: dict) -> Attention:
    """``layer`` (MHA) converted to the method of ``spec`` (a registered conversion method, its setting by
    the method's ``spec_keys``): SVD for GQA/MLA, truncated HOSVD for Tucker."""
    method = spec["method"]
    if method not in METHODS:
        raise ValueError(f"conversion target must be one of {list(METHODS)}, got {method!r}")
    record = conversion_method(method)
    options = {"value_ranks": spec["value_ranks"]} if spec.get("value_ranks") is not None else {}
    return convert_layer(layer, method, record.from_spec(spec), **options)


def convert_model(model: torch.nn.Module, spec: dict) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` with every block's attention converted; returns (model, the new
    layers' attention spec for the model config)."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.attn = _convert(block.attn, spec)
    new_spec = layer_spec(model.blocks[0].attn)
    model.config.attention = new_spec
    return model, new_spec


def run_finetune_compare(preset: str = "default", out: str | Path = "finetune-out", *, source: str | None = None,
                         seeds: int | None = None, steps: int | None = None, progress: bool = True) -> list[dict]:
    """The protocol; writes ``results.json`` and ``finetune.png`` in ``out`` and returns the records."""
    if preset not in FINETUNE_PRESETS:
        raise ValueError(f"preset must be one of {sorted(FINETUNE_PRESETS)}, got {preset!r}")
    p = FINETUNE_PRESETS[preset]
    out = Path(out)
    base = VIT_PRESETS[p.baseline]
    base_config = RunConfig.from_dict({"task": "vit", "model": {**base.model, "attention": {"method": "mha"}},
                                       "train": {**base.train, "progress": progress}, "data": dict(base.data)})
    if source is None:
        dry = make_task(base_config).build_model()
        for spec in p.settings.values():  # rank checks before the baseline trains
            convert_model(dry, spec)
        run_dir = out / "runs" / "mha-baseline"
        if finished(run_dir, base_config) is None:
            print(f"training the MHA baseline in {run_dir}", flush=True)
            train(base_config, run_dir, overwrite=True)
        source = run_dir
    baseline, extra = load_trained_model(source, task="vit")
    if any(block.attn.method != "mha" for block in baseline.blocks):
        raise ValueError(f"--from must be an MHA model, got attention {extra['model_config']['attention']}")
    config_dict = extra["config"]
    task = make_task(RunConfig.from_dict({**config_dict, "model": extra["model_config"]}))

    converted = {label: convert_model(baseline, spec) for label, spec in p.settings.items()}  # checks all ranks
    records = [{**spec_record("MHA (baseline)", {"method": "mha"}), **_sizes(baseline),
                "converted_accuracy": _accuracy(task, baseline), "finetuned_accuracy": None}]
    records[0]["finetuned_accuracy"] = records[0]["converted_accuracy"]
    n_seeds = seeds or p.seeds
    for i, (label, (model, spec)) in enumerate(converted.items()):
        acc0 = _accuracy(task, model)
        print(f"[{i + 1}/{len(converted)}] {label}: accuracy right after conversion {acc0:.4f}", flush=True)
        accs = []
        for seed in range(n_seeds):
            cfg = {**config_dict, "model": {**extra["model_config"], "attention": spec},
                   "train": {**p.finetune, "seed": seed, "progress": progress, **({"steps": steps} if steps else {})}}
            run_config = RunConfig.from_dict(cfg)
            run_dir = out / "runs" / f"{slug(label)}-seed{seed}"
            summary = finished(run_dir, run_config) or train(
                run_config, run_dir, overwrite=True, task=make_task(run_config, reuse=task),
                init_state=model.state_dict())
            accs.append(summary["val_accuracy"])
        records.append({**spec_record(label, p.settings[label]), **_sizes(model), "converted_accuracy": acc0,
                        "finetuned_accuracy": statistics.mean(accs),
                        "finetuned_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "finetuned_accuracies": accs, "seeds": n_seeds})
    add_ratios(records, "finetuned_accuracy", higher_is_better=True)
    write_json_atomic(out / "results.json", records)
    plot_finetune(records, out / "finetune.png")
    return records


def _sizes(model) -> dict:
    return {"attention_params": model.attention_params, "kv_bytes_per_token": model.kv_bytes_per_token(torch.bfloat16)}


def _accuracy(task, model) -> float:
    model.eval()
    return task.evaluate(model, torch.device("cpu"), 0, 1, 256, contextlib.nullcontext)["val_accuracy"]


def format_finetune_table(records: list[dict]) -> str:
    head = ["model", "method", "attn params", "vs MHA", "KV B/token (bf16)", "acc converted", "acc fine-tuned",
            "Δ vs MHA"]
    rows = []
    for r in records:
        tuned = f"{r['finetuned_accuracy']:.4f}"
        if r.get("seeds"):
            tuned += f" ± {r['finetuned_accuracy_std']:.4f}"
        rows.append([r["label"], r["method"], f"{r['attention_params']:,}", f"{r['attention_param_ratio']:.3f}",
                     str(r["kv_bytes_per_token"]), f"{r['converted_accuracy']:.4f}", tuned,
                     f"{100 * r['finetuned_accuracy_vs_mha']:+.1f} pts"])
    return text_table(head, rows)


def plot_finetune(records: list[dict], path: Path) -> Path:
    """Accuracy vs attention parameters: right after conversion (hollow) and after fine-tuning
    (filled, ± std over seeds); the MHA baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"gqa": "tab:blue", "mla": "tab:green", "tucker": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = records[0]
    ax.axhline(base["finetuned_accuracy"], color="black", ls="--", label="MHA baseline")
    for method in METHODS:
        pts = sorted((r for r in records if r["method"] == method), key=lambda r: r["attention_params"])
        if not pts:
            continue
        x = [r["attention_params"] for r in pts]
        c, title = colors.get(method), conversion_method(method).title or method
        ax.plot(x, [r["converted_accuracy"] for r in pts], "o:", mfc="none", color=c, label=f"{title} converted")
        ax.errorbar(x, [r["finetuned_accuracy"] for r in pts], yerr=[r["finetuned_accuracy_std"] for r in pts],
                    fmt="o-", color=c, capsize=3, label=f"{title} fine-tuned")
        for r in pts:
            ax.annotate(r["label"].split(" ", 1)[1], (r["attention_params"], r["finetuned_accuracy"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("attention parameters (whole model)")
    ax.set_ylabel("validation accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
