"""Gradient accumulation (``train.grad_accum_steps``), ``train.compile`` and the ``gpt2-small`` compare preset.

Accumulating k micro-batches of B equals one step with a batch of k·B: a step draws the k·B
examples at once and trains on rows j·B:(j+1)·B as micro-batch j, each loss scaled by 1/k.
The equality checks run in float64 (``torch.set_default_dtype``): the weights agree to float64
rounding; the logged losses to float32 rounding, since the models compute the cross-entropy in
float32 (``logits.float()``) and a mean of k means rounds differently from one mean.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from ddp import assert_two_processes_match_one  # tests/ddp.py (conftest puts tests/ on sys.path)
from safetensors.torch import load_file

from tucker_attention.data.images import ImageDataset
from tucker_attention.experiments.compare import PRESETS, compare_configs
from tucker_attention.models import GPTConfig
from tucker_attention.training import RunConfig, apply_overrides, make_task, train
from tucker_attention.training import tasks as tasks_module
from tucker_attention.training.checkpoint import latest_checkpoint, step_dirs
from tucker_attention.training.config import TrainConfig
from tucker_attention.training.run_folder import fixed_part

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"line {i % 17} of a small corpus, with words {i * 7 % 13}.\n" for i in range(400))
TRAIN = {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 3, "eval_windows": 8,
         "checkpoint_interval": 3, "log_interval": 1, "progress": False}
LM_MODEL = {"d_model": 32, "n_heads": 4, "n_layers": 1, "block_size": 16}
VIT = {"task": "vit", "data": {"source": "digits", "augment": True},
       "model": {"patch_size": 4, "d_model": 16, "n_heads": 2, "n_layers": 1}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def lm_config(corpus: str, model: dict | None = None, **train_overrides) -> RunConfig:
    return RunConfig.from_dict({"task": "lm", "data": {"path": corpus}, "model": {**LM_MODEL, **(model or {})},
                                "train": {**TRAIN, **train_overrides}})


def vit_config(**train_overrides) -> RunConfig:
    return RunConfig.from_dict({**VIT, "train": {**TRAIN, "batch_size": 8, **train_overrides}})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def weights(run: Path) -> dict:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


@pytest.fixture()
def float64(monkeypatch):
    """Models (and the ViT's normalized images, float32 by design) in float64 for the test."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    normalize = ImageDataset.normalize
    monkeypatch.setattr(ImageDataset, "normalize", lambda self, x: normalize(self, x).to(torch.get_default_dtype()))
    yield
    torch.set_default_dtype(dtype)


def assert_same_training(run: Path, reference: Path, *, weight_tol: float, loss_rel: float) -> None:
    """The same logged steps; losses, grad norms and validation metrics within ``loss_rel``
    (relative); final weights within ``weight_tol`` (absolute)."""
    a, b = metrics(run), metrics(reference)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    checked = 0
    for x, y in zip(a, b):
        for key in ("train_loss", "grad_norm", "val_loss", "val_accuracy"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=loss_rel), (x["step"], key)
                checked += 1
    assert checked
    wa, wb = weights(run), weights(reference)
    assert wa.keys() == wb.keys()
    assert all(wa[k].dtype == torch.get_default_dtype() for k in wa)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= weight_tol
    assert any(not torch.equal(wa[k], load_file(str(step_dirs(run)[-1] / "model.safetensors"))[k]) for k in wa)


def spy_loss(monkeypatch, task_cls) -> list[int]:
    """Record the number of examples of every micro-batch the trainer's loss sees."""
    sizes = []
    real = task_cls.loss

    def loss(self, net, batch, device):
        sizes.append(len(batch[0]))
        return real(self, net, batch, device)

    monkeypatch.setattr(task_cls, "loss", loss)
    return sizes


# --- the option ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, "train.grad_accum_steps must be an integer >= 1, got 0"),
    (-2, ValueError, "train.grad_accum_steps must be an integer >= 1, got -2"),
    (2.0, TypeError, "train.grad_accum_steps must be an integer >= 1, got 2.0"),
    (True, TypeError, "train.grad_accum_steps must be an integer >= 1, got True"),
    ("4", TypeError, "train.grad_accum_steps must be an integer >= 1, got '4'"),
])
def test_bad_grad_accum_steps_are_refused_naming_the_field(value, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        RunConfig.from_dict({"train": {"grad_accum_steps": value}})
    assert TrainConfig().grad_accum_steps == 1 and TrainConfig().compile is False
    assert "grad_accum_steps" in TrainConfig.__doc__ and "compile" in TrainConfig.__doc__


def test_the_options_parse_from_set_and_refuse_bad_text():
    cfg = apply_overrides({}, ["train.grad_accum_steps=8", "train.compile=true"], GPTConfig)
    assert cfg["train"] == {"grad_accum_steps": 8, "compile": True}
    with pytest.raises(ValueError, match="train.grad_accum_steps must be an integer >= 1, got 'two'"):
        apply_overrides({}, ["train.grad_accum_steps=two"], GPTConfig)
    with pytest.raises(ValueError, match="train.compile must be true or false, got 'yes'"):
        apply_overrides({}, ["train.compile=yes"], GPTConfig)
    with pytest.raises(TypeError, match="train.compile must be true or false, got 1"):
        RunConfig.from_dict({"train": {"compile": 1}})


def test_lm_training_windows_hold_no_ignored_targets(corpus):
    """The 1/k scaling is exact because every micro-batch's loss is a mean over the same number
    of targets: the LM's training windows never hold the ignored target -1."""
    task = make_task(lm_config(corpus))
    x, y = task.sample_batch(torch.Generator().manual_seed(0), 64, 0, 1)
    assert int(task.corpus.train.min()) >= 0 and int(y.min()) >= 0 and y.shape == (64, 16)


# --- accumulation equals one larger batch ----------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["mha", {"method": "tucker"}], ids=["mha", "rank-adaptive"])
def test_lm_accumulation_equals_one_batch_of_k_times_the_size(corpus, tmp_path, monkeypatch, float64, attention):
    adaptive = {"rank_budget_params": 0.25, "rank_cuts": 2, "rank_until": 0.5} if attention != "mha" else {}
    model = {"attention": attention}
    train(lm_config(corpus, model, batch_size=12, **adaptive), tmp_path / "big")
    sizes = spy_loss(monkeypatch, tasks_module.LMTask)
    summary = train(lm_config(corpus, model, batch_size=4, grad_accum_steps=3, **adaptive), tmp_path / "accum")
    assert sizes == [4] * 3 * TRAIN["steps"]           # three micro-batches of 4 a step
    assert_same_training(tmp_path / "accum", tmp_path / "big", weight_tol=1e-12, loss_rel=1e-6)
    assert summary["tokens_per_s"] > 0
    speeds = [m["tokens_per_s"] for m in metrics(tmp_path / "accum") if "tokens_per_s" in m]
    assert len(speeds) == TRAIN["steps"]
    if adaptive:
        cuts = [m["step"] for m in metrics(tmp_path / "accum") if "ranks" in m]
        assert cuts == [m["step"] for m in metrics(tmp_path / "big") if "ranks" in m] and len(cuts) == 3


def test_vit_accumulation_equals_one_batch_of_k_times_the_size(tmp_path, monkeypatch, float64):
    """With augmentation: the k·B images are drawn and augmented at once, then split."""
    train(vit_config(batch_size=12), tmp_path / "big")
    sizes = spy_loss(monkeypatch, tasks_module.VisionTask)
    summary = train(vit_config(batch_size=4, grad_accum_steps=3), tmp_path / "accum")
    assert sizes == [4] * 3 * TRAIN["steps"]
    assert_same_training(tmp_path / "accum", tmp_path / "big", weight_tol=1e-12, loss_rel=1e-6)
    assert summary["images_per_s"] > 0


def test_units_count_every_micro_batch(corpus, tmp_path):
    """Throughput counts all micro-batches: 3 micro-batches of 4 windows of 16 tokens a step."""
    summary = train(lm_config(corpus, batch_size=4, grad_accum_steps=3), tmp_path / "accum")
    assert summary["tokens_per_s"] * summary["train_time_s"] == pytest.approx(TRAIN["steps"] * 3 * 4 * 16)


def test_two_ddp_processes_with_accumulation_match_one_and_one_large_batch(corpus, tmp_path):
    """``batch_size`` is global: 2 gloo processes accumulating k=2 micro-batches of 8 (4 a process)
    follow 1 process with the same settings (tests/ddp.py), and that run follows one process
    without accumulation and a batch of 16 (float32 here: 1e-5)."""
    settings = {"steps": 4, "batch_size": 8, "grad_accum_steps": 2, "eval_interval": 2, "log_interval": 1,
                "eval_windows": 16, "checkpoint_interval": 2, "progress": False}
    args = ["train", "--set", f"data.path={corpus}"] + [f"--set=model.{k}={v}" for k, v in LM_MODEL.items()]
    args += [f"--set=train.{k}={str(v).lower()}" for k, v in settings.items()]
    one, _ = assert_two_processes_match_one(args, tmp_path)
    big = RunConfig.from_dict({"task": "lm", "data": {"path": corpus}, "model": LM_MODEL,
                               "train": {**settings, "batch_size": 16, "grad_accum_steps": 1}})
    train(big, tmp_path / "big")
    reference = metrics(tmp_path / "big")
    assert [m["step"] for m in one] == [m["step"] for m in reference]
    for a, b in zip(one, reference):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "big")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


# --- resume ---------------------------------------------------------------------------------------------------------

def test_resume_in_the_middle_of_an_accumulated_step_is_bit_for_bit(corpus, tmp_path, monkeypatch):
    cfg = lm_config(corpus, steps=8, grad_accum_steps=3, log_interval=2, eval_interval=4, checkpoint_interval=3)
    train(cfg, tmp_path / "straight")
    real = tasks_module.LMTask.loss
    calls = {"n": 0}

    def crash(self, *args):
        calls["n"] += 1
        if calls["n"] == 3 * 4 + 2:   # the second micro-batch of step 5, after the step-3 checkpoint
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(tasks_module.LMTask, "loss", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed")
    monkeypatch.setattr(tasks_module.LMTask, "loss", real)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000003"
    train(cfg, tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def records(run):
        return [(m["step"], m.get("train_loss"), m.get("val_loss"), m.get("grad_norm")) for m in metrics(run)]

    assert records(tmp_path / "straight") == records(tmp_path / "resumed")


def test_a_run_written_before_the_options_existed_resumes(corpus, tmp_path):
    """A checkpoint and config.json without ``grad_accum_steps``/``compile`` are the defaults' run."""
    cfg = lm_config(corpus, steps=4, checkpoint_interval=2, eval_interval=2)
    run = tmp_path / "run"
    train(cfg, run)
    stored = json.loads((run / "config.json").read_text())
    for key in ("grad_accum_steps", "compile"):
        del stored["train"][key]
    (run / "config.json").write_text(json.dumps(stored))
    assert fixed_part(stored) == fixed_part(cfg.to_dict())
    train(lm_config(corpus, steps=6, checkpoint_interval=2, eval_interval=2), run, resume=True)
    with pytest.raises(ValueError, match=r"train\.grad_accum_steps differ"):
        train(lm_config(corpus, steps=8, checkpoint_interval=2, eval_interval=2, grad_accum_steps=2), run,
              resume=True)


# --- torch.compile --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="CPU torch.compile (inductor) needs a C++ compiler")
def test_compile_trains_like_the_plain_module(corpus, tmp_path):
    """A real CPU ``torch.compile`` (inductor, ~25 s on one thread): 3 accumulated steps."""
    cfg = {"steps": 3, "grad_accum_steps": 2, "eval_interval": 3, "checkpoint_interval": 3}
    from torch._dynamo.utils import counters

    plain = train(lm_config(corpus, **cfg), tmp_path / "plain")
    compiled = train(lm_config(corpus, compile=True, **cfg), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1      # dynamo did trace the training forward
    assert compiled["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)
    for a, b in zip(metrics(tmp_path / "compiled"), metrics(tmp_path / "plain")):
        if "train_loss" in a:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    wa, wb = weights(tmp_path / "compiled"), weights(tmp_path / "plain")
    assert wa.keys() == wb.keys() and not any("_orig_mod" in k for k in wa)  # the plain module's names
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


class FakeCompiled(torch.nn.Module):
    """What ``torch.compile`` returns, in miniature: the module under ``_orig_mod``."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def test_compile_wraps_the_training_forward_and_recompiles_after_each_rank_cut(corpus, tmp_path, monkeypatch):
    compiled, resets, seen = [], [], []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or FakeCompiled(module))
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(len(compiled)))
    real = tasks_module.LMTask.loss

    def loss(self, net, batch, device):
        seen.append(type(net).__name__)
        return real(self, net, batch, device)

    monkeypatch.setattr(tasks_module.LMTask, "loss", loss)
    model = {"n_layers": 2, "attention": {"method": "tucker"}}
    cfg = lm_config(corpus, model, steps=12, compile=True, grad_accum_steps=2, rank_budget_params=0.25,
                    rank_cuts=3, rank_until=0.5, checkpoint_interval=4, eval_interval=6)
    train(cfg, tmp_path / "run")
    cuts = [m["step"] for m in metrics(tmp_path / "run") if "ranks" in m]
    assert len(cuts) == 4                                 # the start and 3 cuts
    assert len(compiled) == 4 and len({id(m) for m in compiled}) == 1   # the plain model, each time afresh
    assert resets == [0, 1, 2, 3]                         # old graphs dropped before each compile
    assert not any(isinstance(m, FakeCompiled) for m in compiled)
    assert set(seen) == {"FakeCompiled"} and len(seen) == 2 * 12
    assert not any("_orig_mod" in k for k in weights(tmp_path / "run"))


# --- the gpt2-small preset ------------------------------------------------------------------------------------------

def test_gpt2_small_preset_is_the_papers_recipe():
    p = PRESETS["lm"]["gpt2-small"]
    t = p.train
    assert (p.model["d_model"], p.model["n_layers"], p.model["n_heads"], p.model["block_size"]) == (768, 12, 12, 1024)
    assert t["batch_size"] * t["grad_accum_steps"] * p.model["block_size"] == 524_288
    assert (t["beta1"], t["beta2"], t["lr"], t["warmup_steps"], t["weight_decay"]) == (0.9, 0.95, 6e-4, 2000, 0.1)
    assert t["lr"] * t["min_lr_ratio"] == pytest.approx(6e-5)
    assert t["precision"] == "bf16" and t["compile"] is True
    assert set(p.attention) == {"MHA", "GQA kv=4", "GQA kv=2", "MLA dc=128", "Tucker [8,128,128]",
                                "Tucker [8,128,64]", "Tucker [8,64,64]"}
    assert "--data" in p.description and "BPE" in p.description and "524,288" in p.description
    configs = compare_configs("gpt2-small")             # every full-size model checks (on the meta device)
    assert all(c.train.grad_accum_steps == 32 and c.train.compile for c in configs.values())
    steps = t["steps"] * 524_288
    assert f"{steps / 1e9:.1f}B tokens" in p.description


def test_gpt2_small_preset_smoke_runs_on_cpu_with_tiny_shapes(tmp_path):
    """Two steps of one model on the built-in corpus through --set: the smallest shapes that fit
    every entry (Tucker r1 8 <= heads, r2 = MLA's d_c 128 <= d_model)."""
    overrides = ["model.d_model=128", "model.n_heads=8", "model.n_layers=1", "model.block_size=16",
                 "train.batch_size=2", "train.grad_accum_steps=2", "train.steps=2", "train.warmup_steps=1",
                 "train.eval_interval=2", "train.eval_windows=4", "train.checkpoint_interval=2",
                 "train.compile=false", "train.precision=fp32", "train.progress=false"]
    configs = compare_configs("gpt2-small", overrides=overrides)
    config = configs["Tucker [8,128,64]"]
    assert (config.train.beta2, config.train.lr, config.train.grad_accum_steps) == (0.95, 6e-4, 2)
    summary = train(config, tmp_path / "run")
    assert summary["steps"] == 2 and math.isfinite(summary["val_loss"]) and summary["precision"] == "fp32"
    assert summary["attention"]["method"] == "tucker" and list(summary["attention"]["ranks"]) == [8, 128, 64]
