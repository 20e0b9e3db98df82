"""What a run keeps in its folder besides checkpoints: ``metrics.jsonl`` (cut back to the resumed
step), the start-up checks (one writer, writable, no leftovers of killed runs) and the choice of
the checkpoint a resumed run continues from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..io import read_metadata
from .checkpoint import CheckpointError, checkpoint_step, load_run_checkpoint, step_dirs, verify_checkpoint
from .config import renamed
from .lock import LOCK, RunFolderError


class MetricsLog:
    """``metrics.jsonl``, one JSON record per line, written by rank 0 only.

    ``resume_step``: keep the records of steps <= it (a torn last line, the trace of a kill
    mid-write, is dropped), so a resumed run's log equals the uninterrupted run's; None starts
    an empty log. A damaged line before the last is an error naming the file and line.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None or not path.exists():
            path.write_text("")
            return
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("a record needs an integer 'step'")
            except ValueError as err:
                if number == len(lines):  # torn by a kill mid-write
                    break
                raise ValueError(f"{str(path)}:{number} is not a metrics record ({err}); repair or delete "
                                 f"that line to resume") from None
            if record["step"] <= resume_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def log(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def prepare(run_dir: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """Checks and clean-up of a run folder whose lock this process holds; returns what it did.

    Refuses a folder that holds a run unless ``resume`` or ``overwrite`` (which deletes its
    checkpoints, metrics and summary); removes temporary files and folders of killed runs;
    checks that ``checkpoints/`` can be written, before any training step.
    """
    root = run_dir / "checkpoints"
    if not resume and root.exists():
        if not overwrite:
            raise ValueError(f"run folder {str(run_dir)!r} already holds a run; continue it with --resume, "
                             f"choose another --run-dir, or pass --overwrite to start it afresh")
        try:
            shutil.rmtree(root) if root.is_dir() and not root.is_symlink() else root.unlink()
            for name in ("metrics.jsonl", "summary.json"):
                (run_dir / name).unlink(missing_ok=True)
        except OSError as err:
            raise RunFolderError(f"cannot delete the earlier run in {str(run_dir)!r} (--overwrite): {err}") from None
    done = []
    leftovers = [p for folder in (run_dir, root) if folder.is_dir() for p in folder.iterdir()
                 if p.name != LOCK and (p.name.startswith(".") and ".tmp" in p.name or p.name.endswith(".tmp"))]
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if leftovers:
        done.append(f"removed {len(leftovers)} temporary file(s) of an interrupted run: "
                    f"{sorted(p.name for p in leftovers)}")
    try:
        root.mkdir(exist_ok=True)
        probe = root / f".probe.tmp{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"cannot write checkpoints to {str(root)!r}: {err.strerror or err}") from None
    return done


def resume_from(run_dir: Path, build) -> tuple[Path, dict, torch.nn.Module, list[str]]:
    """(checkpoint folder, its state, its model, notes) of the newest intact checkpoint.

    ``build(model_config)`` makes the model of a checkpoint's recorded model config (a
    rank-adaptive run's shapes change while it trains); the weights are loaded into it. Damaged
    checkpoints (files that fail their manifest, non-finite values) are passed over, newest
    first, and each is named in the notes; ``latest.json`` is not needed. Raises when none is
    intact. A checkpoint of another model is an error, not damage.
    """
    candidates = step_dirs(run_dir)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint to resume from in {str(run_dir)!r} "
                                f"(no step folders under {str(run_dir / 'checkpoints')!r})")
    notes, damaged = [], []
    for path in candidates:
        try:
            verify_checkpoint(path)
            model = build(read_metadata(path / "model.safetensors")["extra"].get("model_config"))
            state = load_run_checkpoint(path, model, verified=True)
        except CheckpointError as err:
            damaged.append(path)
            notes.append(f"passing over a damaged checkpoint: {err}")
            continue
        if damaged:
            notes.append(f"resuming from the newest intact checkpoint, {path.name}")
        return path, state, model, notes
    raise CheckpointError(f"no intact checkpoint in {str(run_dir)!r}:\n  " + "\n  ".join(notes))


def set_aside(run_dir: Path, after_step: int) -> list[str]:
    """Rename step folders newer than ``after_step`` (damaged ones a resumed run passed over) to
    ``damaged-step-N`` so rotation never prefers them to the checkpoint the run continues from."""
    notes = []
    for path in step_dirs(run_dir):
        if checkpoint_step(path) > after_step:
            target = path.with_name("damaged-" + path.name)
            while target.exists():
                target = target.with_name(target.name + "-again")
            os.rename(path, target)
            notes.append(f"kept the damaged {path.name} for inspection as {target.name}")
    return notes


def check_resumable(run_dir: Path, config) -> None:
    """Errors a resume can know before it touches the folder: no checkpoints, another config."""
    if not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoint to resume from in {str(run_dir)!r} (it has no checkpoints/ folder)")
    stored = run_dir / "config.json"
    try:
        fixed = fixed_part(json.loads(stored.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return  # missing or damaged: the checkpoint's own config is compared after loading
    if fixed != fixed_part(config.to_dict()):
        changed = sorted(f"{section}.{k}" for section in ("model", "data", "train") for k in
                         set(fixed.get(section, {})) | set(config.to_dict()[section])
                         if fixed.get(section, {}).get(k) != fixed_part(config.to_dict())[section].get(k))
        raise ValueError(f"run folder {str(run_dir)!r} was trained with another config ({', '.join(changed) or 'task'}"
                         f" differ); resume it with its own config (only train.steps and train.progress may change)")


# train keys added after runs were written without them, at the values those runs trained with
_LATER_TRAIN_KEYS = {"grad_accum_steps": 1, "compile": False}


def fixed_part(config: dict) -> dict:
    """A config without the keys a resumed run may change (with the keys added since it was written, and
    today's names of renamed ones)."""
    train = {k: v for k, v in {**_LATER_TRAIN_KEYS, **renamed(config["train"])}.items()
             if k not in ("steps", "progress")}
    return {**config, "train": train}
