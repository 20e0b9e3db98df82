"""Run checkpoints: ``RUN_DIR/checkpoints/step-NNNNNNN/{model.safetensors, state.pt, manifest.json}``
plus a ``latest.json`` pointer.

A checkpoint is written under a temporary name, synced and renamed into place, then the pointer
is replaced atomically, so a crash at any moment leaves the previous checkpoint intact.
``manifest.json`` (written last) records the SHA-256 and size of every file and the run config;
loading verifies it, so a damaged file is an error naming it, never weights trained on silently.
Only finite weights and state are written, and rotation runs after the new checkpoint is in
place, so it never deletes the newest good checkpoint. ``state.pt`` holds only tensors and plain
containers and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io import read_metadata, save_checkpoint
from .guard import NonFiniteError, first_non_finite

POINTER = "latest.json"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "state.pt")
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or does not belong to the model or run."""


def _sha256(path: Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(1 << 22)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
    return digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A file opened for writing that hashes what goes through it (no second read of the file)."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data) -> None:
    """``data`` as JSON at ``path``: written aside, synced, renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The step folders of a run, newest (highest step) first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and checkpoint_step(p) is not None] if root.is_dir() else []
    return sorted(found, key=checkpoint_step, reverse=True)


def save_run_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict, *, extra: dict,
                        keep: int = 2) -> Path:
    """Write the checkpoint of ``step``, point ``latest.json`` at it and keep the newest ``keep``.

    Raises :class:`NonFiniteError` (writing nothing) when the weights or the state hold a NaN/inf.
    """
    bad = first_non_finite(model.state_dict()) or first_non_finite(state)
    if bad:
        raise NonFiniteError(f"step {step}: {bad} is not finite; the checkpoint was not written")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_checkpoint(tmp / "model.safetensors", model, extra=extra)
    with (tmp / "state.pt").open("wb") as f:
        hashed = _HashingWriter(f)
        torch.save(state, hashed)
    for name in FILES:
        _fsync(tmp / name)
    write_manifest(tmp, step, state.get("config"), known={"state.pt": (hashed.digest.hexdigest(), hashed.size)})
    _fsync(tmp)
    if final.exists():  # the same step written again (a run resumed from an older checkpoint)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    write_json_atomic(root / POINTER, {"step": step, "dir": final.name})
    for old in step_dirs(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "sha256"},
                                     sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path, step: int, config: dict | None, known: dict | None = None) -> dict:
    """Seal checkpoint ``folder``: record the SHA-256 and size of its files (``known``: {name:
    (sha256, size)} hashed while written), the run config and the manifest's own SHA-256."""
    known = known or {}
    files = {name: dict(zip(("sha256", "bytes"), known.get(name) or (_sha256(folder / name),
                                                                     (folder / name).stat().st_size)))
             for name in FILES}
    manifest = {"format": 1, "step": step, "files": files, "config": config}
    manifest["sha256"] = _digest(manifest)
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def verify_checkpoint(path: str | Path) -> dict:
    """The manifest of checkpoint folder ``path`` after checking every file against it.

    Raises :class:`CheckpointError` naming the missing, truncated or altered file.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {MANIFEST} (incomplete, damaged, or written by "
                              f"tucker-attention < 0.2); its files cannot be verified")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        intact = manifest["sha256"] == _digest(manifest) and isinstance(files, dict) and set(files) == set(FILES)
    except (ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        raise CheckpointError(f"checkpoint manifest {str(manifest_path)!r} is damaged (it does not match its own "
                              f"SHA-256)")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(f"checkpoint file {str(file)!r} has {size} bytes, its manifest says "
                                  f"{expected.get('bytes')} (truncated or replaced)")
        if _sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"checkpoint file {str(file)!r} does not match its manifest's SHA-256 "
                                  f"(the file was altered or damaged)")
    return manifest


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run that passes :func:`verify_checkpoint` (``latest.json`` is not needed)."""
    path, _ = newest_intact(run_dir)
    return path


def newest_intact(run_dir: str | Path) -> tuple[Path, list[str]]:
    """(newest verified checkpoint folder, why each newer one was passed over)."""
    candidates = step_dirs(run_dir)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint to resume from in {str(run_dir)!r} "
                                f"(no step folders under {str(Path(run_dir) / 'checkpoints')!r})")
    skipped = []
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path, skipped
        except CheckpointError as err:
            skipped.append(str(err))
    raise CheckpointError(f"no intact checkpoint in {str(run_dir)!r}: " + "; ".join(skipped))


def load_run_checkpoint(path: str | Path, model: torch.nn.Module, *, verified: bool = False) -> dict:
    """Verify checkpoint folder ``path`` (unless ``verified``), load its weights into ``model``
    (strictly) and return its state.

    Raises :class:`CheckpointError` for a damaged or non-finite checkpoint, ValueError for one of another model.
    """
    path = Path(path)
    if not verified:
        verify_checkpoint(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or unreadable: {err}") from None
    bad = first_non_finite(weights) or first_non_finite(state)
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite values ({bad})")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {shapes[:5]}")
    model.load_state_dict(weights)
    return state


def checkpoint_file(path: str | Path) -> Path:
    """The verified ``model.safetensors`` of a run folder (its newest intact checkpoint), of a
    checkpoint folder, or ``path`` itself (verified when its manifest is beside it)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = latest_checkpoint(path)
    if path.is_dir():
        verify_checkpoint(path)
        return path / "model.safetensors"
    if (path.parent / MANIFEST).is_file():
        verify_checkpoint(path.parent)
    return path


def load_trained_model(path: str | Path, task: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, checkpoint extra) from a run folder (its newest intact checkpoint), a
    checkpoint folder (verified) or a ``model.safetensors`` (verified when its manifest is beside
    it); the extra holds the task, the run config and what the task needs (tokenizer,
    normalization). ``task``: refuse checkpoints of another task."""
    from ..models import GPT, GPTConfig, ViT, ViTConfig

    path = checkpoint_file(path)
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
