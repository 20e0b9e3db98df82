"""The shared trainer: schedule, parameter groups, config overrides, run files, checkpoints,
bit-for-bit resume, crash safety, DDP equivalence (2 gloo processes under torchrun)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from ddp import assert_two_processes_match_one  # tests/ddp.py (conftest puts tests/ on sys.path)
from safetensors.torch import load_file

from tucker_attention.models import GPT, GPTConfig
from tucker_attention.training import RunConfig, apply_overrides, lr_factor, param_groups, train
from tucker_attention.training import checkpoint as ckpt_module
from tucker_attention.training.checkpoint import latest_checkpoint

TEXT = "".join(f"line {i % 17} of a small corpus, with words {i * 7 % 13}.\n" for i in range(400))


@pytest.fixture()
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def tiny_config(corpus: str, attention="mha", **train) -> RunConfig:
    t = {"steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 4, "eval_windows": 8,
         "checkpoint_interval": 4, "log_interval": 2, "progress": False, **train}
    return RunConfig.from_dict({"task": "lm", "data": {"path": corpus},
                                "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "block_size": 16,
                                          "attention": attention}, "train": t})


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_factor_warmup_then_cosine():
    f = [lr_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(f[10:], f[11:]))  # non-increasing after warmup
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f[110] == pytest.approx(0.1)


def test_param_groups_decay_matrices_only_and_scale_attention():
    model = GPT(GPTConfig(vocab_size=10, block_size=8, d_model=16, n_heads=2, n_layers=1, attention="mha"))
    groups = param_groups(model, lr=1.0, weight_decay=0.1, attention_lr_scale=3.0)
    attn = {id(p) for p in model.blocks[0].attn.parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter once (tied once)
    for g in groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
            assert g["lr"] == (3.0 if id(p) in attn else 1.0)


def test_relative_attention_lr_follows_the_init_scale():
    """The relative rule: lr multiplier = init std × sqrt(d_model), so MHA is unchanged and
    Tucker's head factor U1 (std 1/sqrt(r1)) gets sqrt(d_model / r1)."""
    model = GPT(GPTConfig(vocab_size=10, block_size=8, d_model=32, n_heads=4, n_layers=1,
                          attention={"method": "tucker", "ranks": (2, 8, 8)}))
    layer = model.blocks[0].attn
    lrs = {id(p): g["lr"] for g in param_groups(model, lr=1.0, weight_decay=0.0, lr_rule="relative")
           for p in g["params"]}
    assert lrs[id(layer.U1)] == pytest.approx((32 / 2) ** 0.5)
    assert lrs[id(layer.core)] == pytest.approx((32 / 8) ** 0.5)  # C ~ N(0, 1/r2)
    assert lrs[id(layer.core_tilde)] == pytest.approx((32 / (4 * 8)) ** 0.5)  # C~ ~ N(0, 1/(H r3~))
    assert lrs[id(layer.U2)] == lrs[id(model.wte.weight)] == 1.0
    mha = GPT(GPTConfig(vocab_size=10, block_size=8, d_model=32, n_heads=4, n_layers=1))
    assert {g["lr"] for g in param_groups(mha, lr=1.0, weight_decay=0.1, lr_rule="relative")} == {1.0}


def test_overrides_parse_values_and_refuse_unknown_keys():
    """Values are parsed by the declared types; the attention method may come after its arguments."""
    cfg = apply_overrides({}, ["train.lr=0.01", "train.progress=false", "model.attention.ranks=4,32,16",
                               "model.attention.method=tucker", "data.path=some file.txt"], GPTConfig)
    assert cfg == {"train": {"lr": 0.01, "progress": False}, "data": {"path": "some file.txt"},
                   "model": {"attention": {"method": "tucker", "ranks": (4, 32, 16)}}}
    assert type(cfg["model"]["attention"]["ranks"]) is tuple  # parsed by TuckerAttention's annotation
    with pytest.raises(ValueError, match=r"unknown --set key 'train\.lrr'.*train\.lr"):
        apply_overrides({}, ["train.lrr=1"], GPTConfig)
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["train.lr"], GPTConfig)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['train.bogus'\]"):
        RunConfig.from_dict({"train": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"train\.lr must be a finite float > 0, got 0"):
        RunConfig.from_dict({"train": {"lr": 0}})


def test_train_writes_run_files_and_learns(corpus, tmp_path):
    summary = train(tiny_config(corpus, steps=30, eval_interval=10), tmp_path / "run")
    run = tmp_path / "run"
    metrics = read_metrics(run)
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert [m["step"] for m in metrics if "val_loss" in m] == [10, 20, 30]
    assert val[-1] < val[0] and summary["val_loss"] == pytest.approx(val[-1])
    assert summary["val_loss"] < summary["unigram_val_loss"]
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("val_loss", "best_val_loss", "params", "attention_params", "kv_bytes_per_token", "tokens_per_s",
                "train_time_s"):
        assert key in on_disk
    assert on_disk["kv_bytes_per_token"] == 2 * 32 * 2  # MHA, one layer, k and v, bf16
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 30
    latest = latest_checkpoint(run)
    assert latest.name == "step-0000030" and sorted(p.name for p in latest.iterdir()) == ["manifest.json",
                                                                                          "model.safetensors",
                                                                                          "state.pt"]
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # the newest two are kept


@pytest.mark.parametrize("attention", ["mha", {"method": "tucker", "ranks": [2, 16, 8]}])
def test_resume_continues_bit_for_bit(corpus, tmp_path, monkeypatch, attention):
    train(tiny_config(corpus, attention), tmp_path / "straight")

    from tucker_attention.training import tasks

    original = tasks.LMTask.sample_batch
    calls = {"n": 0}

    def crash_after_six(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # a crash after the step-4 checkpoint
        return original(self, *args)

    monkeypatch.setattr(tasks.LMTask, "sample_batch", crash_after_six)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus, attention), tmp_path / "resumed")
    monkeypatch.setattr(tasks.LMTask, "sample_batch", original)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000004"
    train(tiny_config(corpus, attention), tmp_path / "resumed", resume=True)

    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "resumed") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        return [(m["step"], m.get("train_loss"), m.get("val_loss")) for m in read_metrics(tmp_path / run)]

    assert losses("straight") == losses("resumed")  # no duplicated or missing records either


def test_a_run_and_a_config_file_with_the_old_name_attention_lr_still_resume_and_load(corpus, tmp_path, monkeypatch):
    """``train.lr_rule`` was ``train.attention_lr``: a run folder written with the old name (config.json,
    the checkpoints' config) resumes to the uninterrupted run, and a config holding it loads and takes --set."""
    from tucker_attention.training import tasks

    cfg = tiny_config(corpus, lr_rule="uniform")
    train(cfg, tmp_path / "straight")
    real_to_dict, real_sample = RunConfig.to_dict, tasks.LMTask.sample_batch

    def old_names(self):                                  # what a run of the old version wrote
        d = real_to_dict(self)
        d["train"]["attention_lr"] = d["train"].pop("lr_rule")
        return d

    def crash_after_six(self, *args):
        if crash_after_six.calls == 6:
            raise KeyboardInterrupt                          # after the step-4 checkpoint
        crash_after_six.calls += 1
        return real_sample(self, *args)

    crash_after_six.calls = 0
    monkeypatch.setattr(RunConfig, "to_dict", old_names)
    monkeypatch.setattr(tasks.LMTask, "sample_batch", crash_after_six)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "old")
    monkeypatch.undo()
    stored = json.loads((tmp_path / "old" / "config.json").read_text())
    assert stored["train"]["attention_lr"] == "uniform" and "lr_rule" not in stored["train"]
    train(cfg, tmp_path / "old", resume=True)
    a, b = (load_file(str(latest_checkpoint(tmp_path / run) / "model.safetensors")) for run in ("straight", "old"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert RunConfig.from_dict(stored).train.lr_rule == "uniform"
    assert apply_overrides(stored, ["train.lr_rule=relative"], GPTConfig)["train"]["lr_rule"] == "relative"
    assert apply_overrides(stored, ["train.attention_lr=relative"], GPTConfig)["train"]["lr_rule"] == "relative"
    with pytest.raises(ValueError, match=r"train\.attention_lr \(the old name of train\.lr_rule\)"):
        RunConfig.from_dict({**stored, "train": {**stored["train"], "lr_rule": "relative"}})


def test_resume_refuses_corrupted_and_mismatching_checkpoints(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(corpus), run)
    with pytest.raises(ValueError, match=r"another config \(train\.lr differ\)"):  # before the folder is touched
        train(tiny_config(corpus, lr=1e-2), run, resume=True)
    other = tiny_config(corpus)
    other.model["d_model"] = 64
    with pytest.raises(ValueError, match=r"another config \(model\.d_model differ\)"):
        train(other, run, resume=True)
    (run / "config.json").unlink()                       # then the checkpoint's own config decides
    with pytest.raises(ValueError, match="different config"):
        train(tiny_config(corpus, lr=1e-2), run, resume=True)
    for path in ckpt_module.step_dirs(run):  # steps 8 and 4 (test_faults: one damaged, the other resumes)
        (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"(?s)no intact checkpoint.*step-0000008/model.safetensors' has 22 bytes"):
        train(tiny_config(corpus), run, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(tiny_config(corpus), tmp_path / "empty", resume=True)


def test_weights_must_match_the_model(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(corpus), run)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, d_model=32, n_heads=4, n_layers=2))
    with pytest.raises(ValueError, match="does not match the model"):
        ckpt_module.load_run_checkpoint(latest_checkpoint(run), model)


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def fail_second(obj, file, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            file.write(b"half")  # a partial write, then the crash
            raise OSError("disk full")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", fail_second)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config(corpus), run)
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    latest = latest_checkpoint(run)
    assert latest.name == "step-0000004"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-0000004"]
    summary = train(tiny_config(corpus), run, resume=True)  # the intact checkpoint resumes
    assert summary["steps"] == 8 and math.isfinite(summary["val_loss"])


def test_ddp_two_processes_match_one_process(corpus, tmp_path):
    args = ["train", "--set", f"data.path={corpus}", "--set", "model.d_model=32", "--set", "model.n_heads=4",
            "--set", "model.n_layers=1", "--set", "model.block_size=16", "--set", "train.steps=4",
            "--set", "train.batch_size=8", "--set", "train.progress=false", "--set", "train.eval_interval=2",
            "--set", "train.log_interval=1", "--set", "train.eval_windows=16",
            "--set", "train.checkpoint_interval=2"]
    assert_two_processes_match_one(args, tmp_path)
    wa = load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors"))
    assert not torch.equal(wa["wte.weight"], load_file(str(latest_checkpoint(tmp_path / "one").parent /
                                                           "step-0000002" / "model.safetensors"))["wte.weight"])


def test_bf16_autocast_run(corpus, tmp_path):
    summary = train(tiny_config(corpus, precision="bf16", steps=4), tmp_path / "run")
    assert summary["precision"] == "bf16" and math.isfinite(summary["val_loss"])


def test_hugging_face_text_dataset(tmp_path, monkeypatch):
    """A local datasets dataset with train/validation splits (a stand-in module: no download)."""
    import types

    class Split:
        def __init__(self, rows):
            self.rows, self.column_names = rows, ["text"]

        def __getitem__(self, column):
            return [r[column] for r in self.rows]

    calls = []

    def load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return {"train": Split([{"text": TEXT[:5000]}]), "validation": Split([{"text": TEXT[5000:7000]}])}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    config = RunConfig.from_dict({"data": {"hf_dataset": "my/local-set"},
                                  "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "block_size": 16},
                                  "train": {"steps": 2, "batch_size": 4, "progress": False, "eval_windows": 4}})
    summary = train(config, tmp_path / "run")
    assert calls[0][0] == "my/local-set" and math.isfinite(summary["val_loss"])
    bad = RunConfig.from_dict({"data": {"hf_dataset": "x", "hf_text_column": "body"}})
    with pytest.raises(ValueError, match="has no column 'body'"):
        train(bad, tmp_path / "bad")


def test_a_fresh_run_refuses_a_used_folder_unless_overwrite(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(corpus, steps=8), run)
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny_config(corpus, steps=4), run)
    assert latest_checkpoint(run).name == "step-0000008"  # untouched
    summary = train(tiny_config(corpus, steps=4), run, overwrite=True)
    assert summary["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000004"]
    assert max(m["step"] for m in read_metrics(run)) == 4


def test_a_job_that_leaves_out_a_step_of_the_loop_is_refused_when_built():
    from tucker_attention.training.loop import Job

    class NoLoss(Job):
        def trained(self):
            return torch.nn.Linear(2, 2)

        def start(self, state):
            pass

        def batch(self, generator):
            return []

        def summary(self):
            return {}

    with pytest.raises(TypeError, match=r"abstract method '?loss"):
        NoLoss()
