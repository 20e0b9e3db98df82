"""Rank-adaptive Tucker training: a budget instead of ranks, progressive truncation while training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from ddp import assert_two_processes_match_one  # tests/ddp.py (conftest puts tests/ on sys.path)
from safetensors.torch import load_file

from tucker_attention.cli import main
from tucker_attention.layers import make_attention
from tucker_attention.training import RunConfig, train
from tucker_attention.training import tasks as tasks_module
from tucker_attention.training.checkpoint import latest_checkpoint, load_trained_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"line {i % 17} of a small corpus, with words {i * 7 % 13}.\n" for i in range(400))
MODEL = {"d_model": 32, "n_heads": 4, "n_layers": 2, "block_size": 16, "attention": {"method": "tucker"}}
TRAIN = {"steps": 24, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 12, "eval_windows": 8,
         "checkpoint_interval": 5, "log_interval": 3, "progress": False, "rank_budget_params": 0.25,
         "rank_cuts": 3, "rank_until": 0.5}
MHA_PARAMS = 2 * 4 * 32 * 32  # two layers of W_q, W_k, W_v, W_o


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def config(corpus: str, model: dict | None = None, **train_overrides) -> RunConfig:
    return RunConfig.from_dict({"task": "lm", "data": {"path": corpus}, "model": {**MODEL, **(model or {})},
                                "train": {**TRAIN, **train_overrides}})


def rank_records(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").open()) if "ranks" in r]


@pytest.fixture(scope="module")
def adaptive_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("adaptive") / "run"
    return run, train(config(corpus), run)


def cheapest_increment(spec_ranks, rope: bool) -> int:
    """The fewest parameters one more rank in any mode of any layer would add."""
    costs = []
    for ranks, value_ranks in spec_ranks:
        base = make_attention("tucker", 32, 4, ranks=ranks, value_ranks=value_ranks, rope=rope)
        n = sum(p.numel() for p in base.parameters())
        for side in (0, 1):
            for mode in range(3):
                if rope and side == 0 and mode == 2:
                    continue                      # the RoPE key latent keeps its width
                new = [list(ranks), list(value_ranks)]
                new[side][mode] += 1
                if new[side][mode] > (4 if mode == 0 else 32):
                    continue
                layer = make_attention("tucker", 32, 4, ranks=tuple(new[0]), value_ranks=tuple(new[1]), rope=rope)
                costs.append(sum(p.numel() for p in layer.parameters()) - n)
    return min(costs)


def test_training_ends_within_the_budget_and_learns(adaptive_run):
    run, summary = adaptive_run
    budget = int(0.25 * MHA_PARAMS)
    assert summary["rank_budget"] == {"kind": "params", "budget": budget, "mha": MHA_PARAMS}
    assert summary["attention_params"] <= budget
    final = [tuple(map(tuple, layer)) for layer in summary["ranks"]]
    assert budget - summary["attention_params"] < cheapest_increment(final, rope=True)  # nothing more fits
    records = rank_records(run)
    assert [r["step"] for r in records] == [0, 4, 8, 12]  # the start, then 3 cuts by half of 24 steps
    params = [r["attention_params"] for r in records]
    assert params[0] > 2 * budget and params == sorted(params, reverse=True) and params[-1] == summary[
        "attention_params"]
    assert all(r["ranks"][0][0][2] == records[0]["ranks"][0][0][2] for r in records)  # RoPE key latent fixed
    assert (run / "ranks.png").stat().st_size > 10_000
    val = [m["val_loss"] for m in map(json.loads, (run / "metrics.jsonl").open()) if "val_loss" in m]
    assert val[-1] < summary["unigram_val_loss"] and math.isfinite(val[-1])


def test_the_final_model_loads_and_generates(adaptive_run):
    run, summary = adaptive_run
    model, extra = load_trained_model(run, task="lm")
    assert [list(map(list, (b.attn.ranks, b.attn.value_ranks))) for b in model.blocks] == summary["ranks"]
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("crash", [6, 11])  # between cuts 1 and 2 (resumes from step 5), after cut 2 (step 10)
def test_resume_across_rank_cuts_is_bit_for_bit(corpus, adaptive_run, tmp_path, monkeypatch, crash):
    run, _ = adaptive_run
    real = tasks_module.LMTask.sample_batch
    calls = {"n": 0}

    def crash_at(self, *args):
        calls["n"] += 1
        if calls["n"] == crash:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(tasks_module.LMTask, "sample_batch", crash_at)
    with pytest.raises(KeyboardInterrupt):
        train(config(corpus), tmp_path / "resumed")
    monkeypatch.undo()
    train(config(corpus), tmp_path / "resumed", resume=True)
    a = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "resumed") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def logged(r):
        return [(m["step"], m.get("train_loss"), m.get("val_loss"), m.get("ranks")) for m in
                map(json.loads, (r / "metrics.jsonl").open())]

    assert logged(run) == logged(tmp_path / "resumed")


def test_a_kv_budget_on_a_vision_model(tmp_path):
    cfg = RunConfig.from_dict({"task": "vit", "data": {"source": "digits", "augment": False},
                               "model": {"patch_size": 4, "d_model": 32, "n_heads": 4, "n_layers": 2,
                                         "attention": {"method": "tucker"}},
                               "train": {"steps": 40, "batch_size": 32, "lr": 3e-3, "warmup_steps": 4,
                                         "eval_interval": 40, "checkpoint_interval": 40, "log_interval": 5,
                                         "progress": False, "rank_budget_kv": 0.25, "rank_cuts": 2}})
    summary = train(cfg, tmp_path / "run")
    assert summary["kv_floats_per_token"] <= int(0.25 * 2 * 2 * 32)
    assert summary["rank_budget"]["kind"] == "kv" and summary["val_accuracy"] > 2 * summary["majority_val_accuracy"]


@pytest.mark.parametrize("model,train_overrides,message", [
    ({}, {"rank_budget_params": 10}, r"train\.rank_budget_params=10\.0 is 10 attention parameters; it must lie between "
                                     r"the smallest Tucker setting's [\d,]+ \(all ranks 1\) and MHA's 8,192"),
    ({}, {"rank_budget_params": 9000}, "and MHA's 8,192"),
    ({"attention": {"method": "tucker", "ranks": [2, 8, 8]}}, {}, r"chooses the ranks; drop model\.attention\.ranks"),
    ({"attention": {"method": "gqa", "n_kv_heads": 2}}, {}, "model.attention.method must be 'tucker', got 'gqa'"),
    ({}, {"rank_budget_kv": 0.5}, "give one rank budget"),
    ({"attention": {"method": "tucker", "shared_kv": True}}, {}, "separate key and value latents"),
    ({}, {"rank_until": 0}, r"train\.rank_until must be a finite float in \(0, 1\]"),
])
def test_bad_rank_budgets_are_refused_before_any_folder(corpus, tmp_path, model, train_overrides, message):
    with pytest.raises(ValueError, match=message):
        config(corpus, model, **train_overrides)
    args = ["train", "--run-dir", str(tmp_path / "run"), "--data", corpus]
    args += [f"--set=model.{k}={v}" for k, v in MODEL.items() if k != "attention"]
    spec = {**MODEL["attention"], **model.get("attention", {})}
    args += [f"--set=model.attention.{k}={','.join(map(str, v)) if isinstance(v, list) else str(v).lower()}"
             for k, v in spec.items()]
    args += [f"--set=train.{k}={v}" for k, v in {**TRAIN, **train_overrides}.items() if k != "progress"]
    assert main(args + ["--set=train.progress=false"]) == 2
    assert not (tmp_path / "run").exists()


def test_resume_with_another_budget_is_refused_before_the_folder_is_touched(corpus, adaptive_run, tmp_path):
    run, _ = adaptive_run
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match=r"another config \(train\.rank_budget_params differ\)"):
        train(config(corpus, rank_budget_params=0.2), run, resume=True)
    assert sorted(p.name for p in run.iterdir()) == before


def test_ddp_two_processes_match_one_process(corpus, tmp_path):
    args = ["train", "--data", corpus] + [f"--set=model.{k}={v}" for k, v in MODEL.items() if k != "attention"]
    args += ["--set=model.attention.method=tucker", "--set=train.steps=6", "--set=train.batch_size=8",
             "--set=train.progress=false", "--set=train.eval_interval=3", "--set=train.log_interval=1",
             "--set=train.eval_windows=8", "--set=train.checkpoint_interval=3", "--set=train.rank_budget_params=0.3",
             "--set=train.rank_cuts=2", "--set=train.rank_until=0.5"]
    one, two = assert_two_processes_match_one(args, tmp_path)
    assert [m["ranks"] for m in one if "ranks" in m] == [m["ranks"] for m in two if "ranks" in m]
    assert len([m for m in one if "ranks" in m]) == 3  # the start and 2 cuts
