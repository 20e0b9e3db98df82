"""Fault injection: what survives kills (SIGKILL at random points and mid-write), damaged files,
NaN in weights, state and data, a second writer and unwritable folders.

Each case asserts what survives: the resumed run equals the uninterrupted one (weights bit for
bit, every logged loss), or the error is the clear one and no good checkpoint was deleted.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tucker_attention.training import RunConfig, train
from tucker_attention.training import tasks as tasks_module
from tucker_attention.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_trained_model,
    step_dirs,
    verify_checkpoint,
    write_manifest,
)
from tucker_attention.training.guard import NonFiniteError
from tucker_attention.training.lock import RunFolderError

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical to the one-thread child processes

TEXT = "".join(f"line {i % 17} of a small corpus, with words {i * 7 % 13}.\n" for i in range(400))
# log, checkpoint and eval intervals that are not multiples of each other
TRAIN = {"steps": 40, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 10, "eval_windows": 8,
         "checkpoint_interval": 5, "log_interval": 3, "progress": False}

# A child process that trains, optionally dying (SIGKILL) in the middle of writing a checkpoint file,
# or that only holds a run folder's lock.
CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from tucker_attention.training import RunConfig, train
from tucker_attention.training import checkpoint as ck
config, run, fault = RunConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3]
if fault == "lock":
    from tucker_attention.training.lock import RunLock
    RunLock(run).acquire()
    print("locked", flush=True)
    time.sleep(600)
if fault != "none":
    target, nth = fault.split(":")
    seen = {"n": 0}
    def due(path):
        if Path(path).name == target:
            seen["n"] += 1
            return seen["n"] == int(nth)
        return False
    def half_then_die(path):
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real_save_checkpoint, real_torch_save, real_json = ck.save_checkpoint, ck.torch.save, ck.write_json_atomic
    def save_checkpoint(path, *a, **k):
        out = real_save_checkpoint(path, *a, **k)
        if due(path):
            half_then_die(path)
        return out
    def torch_save(obj, file, *a, **k):  # file: the checkpoint's writer that hashes what it writes
        real_torch_save(obj, file, *a, **k)
        if due(file.f.name):
            file.f.flush()
            half_then_die(file.f.name)
    def write_json(path, data):
        if due(path):
            tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
            text = json.dumps(data)
            tmp.write_text(text[: len(text) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real_json(path, data)
    ck.save_checkpoint, ck.torch.save, ck.write_json_atomic = save_checkpoint, torch_save, write_json
train(config, run)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def config_dict(corpus: str, **train_overrides) -> dict:
    return {"task": "lm", "data": {"path": corpus},
            "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "block_size": 16},
            "train": {**TRAIN, **train_overrides}}


def config(corpus: str, **train_overrides) -> RunConfig:
    return RunConfig.from_dict(config_dict(corpus, **train_overrides))


def records(run: Path) -> list[tuple]:
    """The logged values that must match between runs (speeds excluded)."""
    keep = ("train_loss", "val_loss", "grad_norm", "skipped", "stopped")
    return [(r["step"], *(r.get(k) for k in keep)) for r in map(json.loads, (run / "metrics.jsonl").open())]


def final_weights(run: Path) -> dict:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def assert_same_run(run: Path, reference: Path) -> None:
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(run) == records(reference)
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]
    assert leftovers == []


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(config(corpus), run)
    return run


def crash_at(monkeypatch, step: int) -> None:
    """Make the next run raise (like a crash) when it draws the batch of ``step``."""
    real = tasks_module.LMTask.sample_batch
    calls = {"n": 0}

    def sample_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(tasks_module.LMTask, "sample_batch", sample_batch)


def crashed_run(corpus, tmp_path, monkeypatch, step: int = 23) -> Path:
    """A run that crashed at ``step`` (checkpoints of steps 15 and 20 kept)."""
    run = tmp_path / "run"
    crash_at(monkeypatch, step)
    with pytest.raises(KeyboardInterrupt):
        train(config(corpus), run)
    monkeypatch.undo()
    assert [p.name for p in step_dirs(run)] == ["step-0000020", "step-0000015"]
    return run


def child(corpus: str, run: Path, fault: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config_dict(corpus)), str(run), fault],
                            env=env, **popen)


# --- kills -----------------------------------------------------------------------------------------------------

def logged_step(run: Path) -> int:
    try:
        return max((json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]),
                   default=0)
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_point_then_resume_equals_the_uninterrupted_run(corpus, reference, tmp_path, trial):
    """Killed a random moment after a random logged step: mid-step, mid-evaluation or mid-checkpoint."""
    rng = random.Random(trial)
    run, target, jitter = tmp_path / "run", rng.randrange(6, 31), rng.uniform(0.0, 0.02)
    proc = child(corpus, run, "none", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while logged_step(run) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(jitter)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL and not (run / "summary.json").exists()  # killed mid-run
    train(config(corpus), run, resume=True)
    assert_same_run(run, reference)


@pytest.mark.parametrize("target", ["model.safetensors", "state.pt", "manifest.json", "latest.json"])
def test_sigkill_in_the_middle_of_writing_a_checkpoint_file(corpus, reference, tmp_path, target):
    run = tmp_path / "run"
    proc = child(corpus, run, f"{target}:3", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    newest = step_dirs(run)[0]
    # the checkpoint being written (step 15) is not in place unless only the pointer was torn
    assert newest.name == ("step-0000015" if target == "latest.json" else "step-0000010")
    verify_checkpoint(newest)
    train(config(corpus), run, resume=True)
    assert_same_run(run, reference)


# --- damaged files ---------------------------------------------------------------------------------------------

def flip(path: Path, offset_from_end: int, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[len(data) - offset_from_end + i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,count", [("model.safetensors", 1), ("state.pt", 16), ("manifest.json", 1)])
def test_a_flipped_byte_in_any_checkpoint_file_is_caught(corpus, reference, tmp_path, monkeypatch, capsys, name,
                                                         count):
    run = crashed_run(corpus, tmp_path, monkeypatch)
    damaged = run / "checkpoints" / "step-0000020"
    flip(damaged / name, 200 if name != "manifest.json" else 40, count)
    with pytest.raises(CheckpointError, match=str(damaged)):
        verify_checkpoint(damaged)
    with pytest.raises(CheckpointError):
        load_trained_model(damaged)
    assert load_trained_model(run)[1]["config"]["train"]["steps"] == 40  # the run folder: newest intact (15)
    capsys.readouterr()
    train(config(corpus), run, resume=True)
    err = capsys.readouterr().err
    assert "passing over a damaged checkpoint" in err and "step-0000020" in err
    assert "resuming from the newest intact checkpoint, step-0000015" in err
    assert (run / "checkpoints" / "damaged-step-0000020").is_dir()  # kept for inspection, out of rotation
    assert_same_run(run, reference)


def test_a_float_changed_inside_the_weights_is_refused_not_trained_on(corpus, tmp_path, monkeypatch):
    """The measured case: one U2 entry becomes 70.05 (a valid safetensors file)."""
    from safetensors.torch import save_file

    from tucker_attention.io import read_metadata

    run = tmp_path / "run"
    train(config(corpus, steps=10, checkpoint_interval=10), run)
    path = latest_checkpoint(run) / "model.safetensors"
    weights = load_file(str(path))
    weights["blocks.0.attn.q_proj.weight"][0, 0] = 70.05
    save_file(weights, str(path), metadata={"tucker_attention": json.dumps(read_metadata(path))})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*SHA-256"):
        verify_checkpoint(path.parent)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train(config(corpus, steps=12, checkpoint_interval=10), run, resume=True)


@pytest.mark.parametrize("pointer", ["deleted", "garbage", "names a missing folder"])
def test_resume_without_a_usable_latest_json(corpus, reference, tmp_path, monkeypatch, pointer):
    run = crashed_run(corpus, tmp_path, monkeypatch)
    path = run / "checkpoints" / "latest.json"
    if pointer == "deleted":
        path.unlink()
    else:
        path.write_text("{not json" if pointer == "garbage" else '{"step": 35, "dir": "step-0000035"}')
    train(config(corpus), run, resume=True)
    assert_same_run(run, reference)


def test_a_torn_last_metrics_line_is_cut_back(corpus, reference, tmp_path, monkeypatch):
    run = crashed_run(corpus, tmp_path, monkeypatch)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 23, "train_lo')  # killed mid-write
    train(config(corpus), run, resume=True)
    assert_same_run(run, reference)


def test_a_damaged_metrics_line_before_the_last_is_named(corpus, tmp_path, monkeypatch):
    run = crashed_run(corpus, tmp_path, monkeypatch)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = "garbage"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{run / 'metrics.jsonl'}:3 is not a metrics record"):
        train(config(corpus), run, resume=True)
    assert [p.name for p in step_dirs(run)] == ["step-0000020", "step-0000015"]


def test_leftover_temporary_folders_are_removed(corpus, reference, tmp_path, monkeypatch, capsys):
    run = crashed_run(corpus, tmp_path, monkeypatch)
    (run / "checkpoints" / ".step-0000025.tmp999").mkdir()
    (run / "checkpoints" / ".latest.json.tmp999").write_text("{")
    (run / ".summary.json.tmp999").write_text("{")
    capsys.readouterr()
    train(config(corpus), run, resume=True)
    assert "removed 3 temporary file(s)" in capsys.readouterr().err
    assert_same_run(run, reference)


# --- NaN -------------------------------------------------------------------------------------------------------

def poison_loss(monkeypatch, steps: set[int], what: str = "weights"):
    """Make the loss of ``steps`` NaN: via a NaN weight (persistent) or NaN data (that step only)."""
    real = tasks_module.LMTask.loss
    calls = {"n": 0}

    def loss(self, net, batch, device):
        calls["n"] += 1
        if calls["n"] in steps:
            if what == "weights":
                with torch.no_grad():
                    net.blocks[0].attn.q_proj.weight[0, 0] = float("nan")
            else:
                return real(self, net, batch, device) * float("nan")
        return real(self, net, batch, device)

    monkeypatch.setattr(tasks_module.LMTask, "loss", loss)


def test_nan_weights_stop_the_run_and_keep_the_good_checkpoints(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_loss(monkeypatch, {23})
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan, grad_norm nan at step 23.*max_bad_steps=0"):
        train(config(corpus), run)
    assert [p.name for p in step_dirs(run)] == ["step-0000020", "step-0000015"]
    for path in step_dirs(run):
        verify_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in load_file(str(path / "model.safetensors")).values())
    assert records(run)[-1][0] == 23 and "non-finite loss" in records(run)[-1][-1]
    assert not (run / "summary.json").exists()


def test_nan_data_steps_are_skipped_within_max_bad_steps(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_loss(monkeypatch, {4, 17}, what="data")
    summary = train(config(corpus, max_bad_steps=2), run)
    skipped = [r for r in records(run) if r[4]]
    assert [r[0] for r in skipped] == [4, 17] and all("loss nan" in r[4] for r in skipped)
    assert summary["skipped_steps"] == 2 and math.isfinite(summary["val_loss"])
    poison_loss(monkeypatch, {4, 17, 30}, what="data")
    with pytest.raises(NonFiniteError, match="at step 30; stopped after 3 bad step"):
        train(config(corpus, max_bad_steps=2), tmp_path / "other")


def test_a_checkpoint_whose_state_holds_nan_is_passed_over(corpus, reference, tmp_path, monkeypatch):
    """NaN in a self-consistent state.pt (its manifest rewritten to match): found on load, not trained on."""
    run = crashed_run(corpus, tmp_path, monkeypatch)
    path = run / "checkpoints" / "step-0000020"
    state = torch.load(path / "state.pt", weights_only=True)
    next(iter(state["optimizer"]["state"].values()))["exp_avg_sq"].fill_(float("nan"))
    torch.save(state, path / "state.pt")
    write_manifest(path, 20, state["config"])  # re-sealed: the files match their manifest ...
    verify_checkpoint(path)
    train(config(corpus), run, resume=True)  # ... but the NaN is found and step 15 resumes
    assert_same_run(run, reference)


def test_fine_tuning_from_nan_weights_stops_at_the_first_step(corpus, tmp_path):
    from tucker_attention.training import make_task

    cfg = config(corpus)
    state = make_task(cfg).build_model().state_dict()
    state["blocks.0.attn.o_proj.weight"][1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="at step 1"):
        train(cfg, tmp_path / "run", init_state=state)
    assert step_dirs(tmp_path / "run") == []


def test_nan_images_stop_a_vision_run(tmp_path, monkeypatch):
    real = tasks_module.VisionTask.sample_batch
    calls = {"n": 0}

    def sample_batch(self, *args):
        calls["n"] += 1
        x, y = real(self, *args)
        return (x * float("nan"), y) if calls["n"] == 3 else (x, y)

    monkeypatch.setattr(tasks_module.VisionTask, "sample_batch", sample_batch)
    cfg = RunConfig.from_dict({"task": "vit", "data": {"source": "digits", "augment": False},
                               "model": {"patch_size": 4, "d_model": 16, "n_heads": 2, "n_layers": 1},
                               "train": {"steps": 6, "batch_size": 8, "eval_interval": 6, "checkpoint_interval": 2,
                                         "log_interval": 1, "progress": False}})
    with pytest.raises(NonFiniteError, match="at step 3"):
        train(cfg, tmp_path / "run")
    assert [p.name for p in step_dirs(tmp_path / "run")] == ["step-0000002"]


def cli_args(corpus: str, run: Path) -> list[str]:
    args = ["train", "--run-dir", str(run), "--data", corpus]
    args += [f"--set=model.{k}={v}" for k, v in config_dict(corpus)["model"].items()]
    return args + [f"--set=train.{k}={str(v).lower()}" for k, v in TRAIN.items()]


def test_the_cli_exits_non_zero_on_a_non_finite_loss(corpus, tmp_path, monkeypatch, capsys):
    from tucker_attention.cli import main

    poison_loss(monkeypatch, {3})
    assert main(cli_args(corpus, tmp_path / "run")) == 3
    assert "non-finite loss nan, grad_norm nan at step 3" in capsys.readouterr().err


def test_the_cli_resumes_without_config_json_from_the_checkpoint_manifest(corpus, reference, tmp_path, monkeypatch):
    from tucker_attention.cli import main

    run = crashed_run(corpus, tmp_path, monkeypatch)
    (run / "config.json").unlink()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert_same_run(run, reference)


# --- one writer, writable folders ------------------------------------------------------------------------------

def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(corpus, reference, tmp_path, capsys):
    run = tmp_path / "run"
    holder = child(corpus, run, "lock", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
    try:
        for resume in (False, True):
            if resume:
                (run / "checkpoints").mkdir()
            with pytest.raises(RunFolderError, match=rf"is in use by process {holder.pid} on host"):
                train(config(corpus), run, resume=resume)
        assert not (run / "metrics.jsonl").exists() and not (run / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    (run / "checkpoints").rmdir()
    capsys.readouterr()
    train(config(corpus), run)  # the killed holder's lock is stale
    assert f"took over the stale lock of process {holder.pid}" in capsys.readouterr().err
    assert_same_run(run, reference)
    assert (run / ".lock").read_text() == ""  # released


def test_unwritable_run_folders_are_refused_before_any_step(corpus, tmp_path):
    """Folders that cannot be written even by root: under a file, and a checkpoints/ inside /proc."""
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="cannot write to the run folder .*file/run"):
        train(config(corpus), tmp_path / "file" / "run")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to("/proc", target_is_directory=True)
    with pytest.raises(RunFolderError, match=rf"cannot write checkpoints to '{run / 'checkpoints'}'"):
        train(config(corpus), run, resume=True)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints"]  # no step was trained
