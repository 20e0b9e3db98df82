"""The run folders and records of ``tucker-attn compare``: whether a model's run finished (or can
resume) under the same config, and one record per model (its spec, sizes and results)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..training import RunConfig


def make_task_type(task: str):
    """The task type (``TASK_TYPES[task]``) of ``task``; a ValueError for an unknown one."""
    from ..training.tasks import TASK_TYPES

    if task not in TASK_TYPES:
        raise ValueError(f"task must be one of {sorted(TASK_TYPES)}, got {task!r}")
    return TASK_TYPES[task]


def slug(label: str) -> str:
    """A folder name for a model label: "Tucker [4,16,8]" -> "tucker-4-16-8"."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def write_json_atomic(path: Path, data) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def same_config(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir``'s ``config.json`` is ``config`` (the progress flag aside)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return False
    try:  # through RunConfig, so a run written before a train option existed gets its default
        stored = RunConfig.from_dict(json.loads(path.read_text())).to_dict()
    except (ValueError, TypeError, KeyError):
        return False
    stored["train"]["progress"] = config.train.progress
    return json.loads(json.dumps(stored)) == json.loads(json.dumps(config.to_dict()))


def finished(run_dir: Path, config: RunConfig) -> dict | None:
    """The summary of a run of ``config`` in ``run_dir`` that trained all its steps, else None."""
    path = run_dir / "summary.json"
    if not path.is_file() or not same_config(run_dir, config):
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("steps") == config.train.steps else None


def spec_record(label: str, spec: dict) -> dict:
    """``label``, ``method`` and the method's own size arguments of an attention spec."""
    spec = dict(spec)
    method = spec.pop("method")
    return {"label": label, "method": method, **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}}


def run_record(label: str, config: RunConfig, summary: dict, task_type, train_settings: dict | None = None) -> dict:
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
