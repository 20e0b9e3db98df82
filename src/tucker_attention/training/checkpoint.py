"""Run checkpoints: ``RUN_DIR/checkpoints/step-NNNNNNN/{model.safetensors, state.pt}`` plus a
``latest.json`` pointer. A checkpoint directory is written under a temporary name and renamed
into place, then the pointer is replaced atomically, so a crash at any moment leaves the
previous checkpoint intact. ``state.pt`` holds only tensors and plain containers and is read
with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io import read_metadata, save_checkpoint

POINTER = "latest.json"


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def save_run_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict, *, extra: dict,
                        keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` and point ``latest.json`` at it; keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_checkpoint(tmp / "model.safetensors", model, extra=extra)
    torch.save(state, tmp / "state.pt")
    if final.exists():  # the same step written again (e.g. a run resumed at its last step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_json_atomic(root / POINTER, {"step": step, "dir": final.name})
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path:
    root = Path(run_dir) / "checkpoints"
    pointer = root / POINTER
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from in {str(run_dir)!r} (missing {pointer})")
    try:
        target = root / json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint pointer {str(pointer)!r} is corrupted: {err}") from None
    if not target.is_dir():
        raise ValueError(f"checkpoint pointer {str(pointer)!r} names {target.name!r}, which does not exist")
    return target


def load_run_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Load the weights of checkpoint dir ``path`` into ``model`` (strictly) and return its state."""
    path = Path(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"checkpoint {str(path)!r} is corrupted or unreadable: {err}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {shapes[:5]}")
    model.load_state_dict(weights)
    return state


def load_trained_model(path: str | Path, task: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, checkpoint extra) from a run folder, a checkpoint folder or its
    ``model.safetensors``; the extra holds the task, the run config and what the task needs
    (tokenizer, normalization). ``task``: refuse checkpoints of another task."""
    from ..models import GPT, GPTConfig, ViT, ViTConfig

    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = latest_checkpoint(path)
    if path.is_dir():
        path = path / "model.safetensors"
    extra = read_metadata(path)["extra"]
    models = {"lm": (GPT, GPTConfig), "vit": (ViT, ViTConfig)}
    if extra.get("task") not in models or "model_config" not in extra:
        raise ValueError(f"{str(path)!r} is not a checkpoint of a training run (task {extra.get('task')!r})")
    if task is not None and extra["task"] != task:
        raise ValueError(f"{str(path)!r} is a checkpoint of task {extra['task']!r}, not {task!r}")
    cls, config_cls = models[extra["task"]]
    model = cls(config_cls(**extra["model_config"]))
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ValueError(f"checkpoint {str(path)!r} does not match its recorded model config: {err}") from None
    return model.eval(), extra
